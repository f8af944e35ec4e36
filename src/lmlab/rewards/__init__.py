"""Reward models, WARM weight averaging, prediction ensembles and gold rewards behind one
`Reward` interface (see docs/rewards.md)."""
from lmlab.rewards.base import EnsembleReward, GoldReward, ModelReward, Reward
from lmlab.rewards.io import load_reward_model, save_reward_model

__all__ = ["EnsembleReward", "GoldReward", "ModelReward", "Reward", "load_reward_model", "save_reward_model"]
