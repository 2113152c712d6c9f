"""Integrations with training frameworks, in their own idiom: ``se_surgery.integrations.lightning`` (a Lightning
``Callback``) and ``se_surgery.integrations.transformers`` (a ``TrainerCallback``). Each imports its framework
when imported itself."""
