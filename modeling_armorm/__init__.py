"""ArmoRM for transformers: `import modeling_armorm` registers the model with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .chat_template import gating_pattern_from_tokenizer
from .configuration_armorm import ArmoRMConfig
from .modeling_armorm import ArmoRMForRewardModeling, ArmoRMGatingNetwork, ArmoRMPreTrainedModel, ArmoRMRewardOutput
from .trl_reward import ArmoRMReward


AutoConfig.register(ArmoRMConfig.model_type, ArmoRMConfig, exist_ok=True)
AutoModel.register(ArmoRMConfig, ArmoRMForRewardModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ArmoRMConfig, ArmoRMForRewardModeling, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the two model files next to the weights (remote code).
ArmoRMConfig.register_for_auto_class()
ArmoRMForRewardModeling.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ArmoRMConfig",
    "ArmoRMForRewardModeling",
    "ArmoRMGatingNetwork",
    "ArmoRMPreTrainedModel",
    "ArmoRMReward",
    "ArmoRMRewardOutput",
    "gating_pattern_from_tokenizer",
]
