"""ArmoRM for transformers: `import modeling_armorm` registers the model with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .chat_template import gating_pattern_from_tokenizer, turn_header_patterns_from_tokenizer
from .configuration_armorm import ArmoRMConfig
from .explanation import Explanation, ObjectiveContribution
from .modeling_armorm import (
    ArmoRMForRewardModeling,
    ArmoRMGatingNetwork,
    ArmoRMPreTrainedModel,
    ArmoRMRewardOutput,
    NonFiniteScoreError,
)
from .pipeline import TASK, ArmoRMPipeline
from .plot import plot_explanation
from .trl_reward import ArmoRMReward


AutoConfig.register(ArmoRMConfig.model_type, ArmoRMConfig, exist_ok=True)
AutoModel.register(ArmoRMConfig, ArmoRMForRewardModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ArmoRMConfig, ArmoRMForRewardModeling, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the model files (configuration, modeling, heads) next to the
# weights (remote code).
ArmoRMConfig.register_for_auto_class()
ArmoRMForRewardModeling.register_for_auto_class("AutoModelForSequenceClassification")
# `transformers.pipeline("reward-scoring", model=PATH)`: score, compare, rank and explain conversations.
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ArmoRMPipeline, pt_model=ArmoRMForRewardModeling, type="text")

__all__ = [
    "ArmoRMConfig",
    "ArmoRMPipeline",
    "ArmoRMForRewardModeling",
    "ArmoRMGatingNetwork",
    "ArmoRMPreTrainedModel",
    "ArmoRMReward",
    "ArmoRMRewardOutput",
    "Explanation",
    "NonFiniteScoreError",
    "ObjectiveContribution",
    "gating_pattern_from_tokenizer",
    "plot_explanation",
    "turn_header_patterns_from_tokenizer",
]
