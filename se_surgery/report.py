"""Tables of what se_surgery did to a model."""

from __future__ import annotations

from torch import nn

from .equalizer import equalizers


def describe(model: nn.Module) -> str:
    """One row per equalizer: where, factor, align_corners, fusion, level, mean, std (and compensation)."""
    rows = []
    for eq in equalizers(model):
        site = eq.site
        factor = f"x{site.factor:.3g}" if site.factor else "-"
        if eq.is_calibrated:
            mean = f"{eq.mean.mean().item():.4g}" + ("*" if eq.per_channel else "")
            std = f"{eq.std.mean().item():.4g}" + ("*" if eq.per_channel else "")
        else:
            mean = std = "uncalibrated"
        rows.append([site.name, site.kind, factor, str(site.align_corners) if site.kind == "upsample" else "-",
                     site.fusion, str(site.level), mean, std, eq.compensation or "-", site.source])
    if not rows:
        return f"{type(model).__name__}: no scale equalizers."
    header = ["site", "kind", "factor", "align_corners", "fusion", "level", "mean", "std", "preserve", "source"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    change = getattr(model, "_se_output_change", None)
    foot = f"{len(rows)} equalizer(s) in {type(model).__name__}"
    if any(eq.per_channel for eq in equalizers(model)):
        foot += "; * = mean over channels"
    if change is not None:
        foot += f"; preserve_function moved the output by {change:.3g} (relative)"
    return "\n".join(lines + [foot])
