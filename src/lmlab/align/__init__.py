"""Preference optimisation of a policy on top of the one loop: DPO and its variants,
SFT-then-DPO, iterative DPO (see docs/alignment.md)."""
