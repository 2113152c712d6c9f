"""The graph pass's rule on hand-written modules: which resizes are sites, and one equalizer per call of a shared
upsampling module."""

import torch
import torch.nn.functional as F
from torch import nn

import se_surgery as se


def test_rule_cases_on_hand_written_modules():
    class Cases(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, a, b):
            logits = F.interpolate(a, scale_factor=2, mode="bilinear")           # output only: no site
            near = F.interpolate(b, scale_factor=2, mode="nearest")             # nearest: no site
            lin = self.conv(self.up(b))                                         # linear, then a sum: site
            act = torch.relu(F.interpolate(b, scale_factor=2, mode="bilinear"))  # nonlinear before the sum: no
            return logits, near + lin + act

    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sites = se.find_sites(torch.export.export(Cases(), (a, b), strict=False))
    assert [s.name for s in sites] == ["up.call0_resize0"]
    assert sites[0].fusion == "add" and sites[0].factor == 2


def test_shared_upsample_module_gets_one_equalizer_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")

        def forward(self, a, b):
            return torch.cat([self.up(a), self.up(b), F.avg_pool2d(a, 1).repeat(1, 1, 2, 2)], 1)

    a, b = torch.randn(2, 2, 4, 4), 10 * torch.randn(2, 2, 4, 4)
    eq = se.equalize(Shared(), (a, b), [(a, b)], progress=False)
    names = sorted(e.site.name for e in se.equalizers(eq))
    assert names == ["up.call0_resize0", "up.call1_resize0"]
    stds = sorted(e.std.item() for e in se.equalizers(eq))
    assert stds[1] > 5 * stds[0]  # the second call's input is ten times larger: its own statistics
