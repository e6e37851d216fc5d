"""Preference losses (DPO family, reference-free SimPO/CPO/ORPO, unpaired KTO).

    from prefopt.losses import preference_loss, kto_loss

Every formula lives once in ``prefopt.losses.table``; see README.md (section "Losses").
"""
from prefopt.losses.api import F_DIVERGENCE_TYPES, LOSS_TYPES, kto_loss, preference_loss

__all__ = ["preference_loss", "kto_loss", "LOSS_TYPES", "F_DIVERGENCE_TYPES"]
