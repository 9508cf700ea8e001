"""Model registry: `hamnet` (our small residual CNN) and torchvision backbones with a 7-class head.

    from hamengine.models import create_model, list_models, model_info, gradcam_target_layer
"""
from hamengine.models.pretrained import PretrainedError
from hamengine.models.registry import (
                                       count_params,
                                       create_model,
                                       get_spec,
                                       gradcam_target_layer,
                                       list_models,
                                       model_info,
)

__all__ = ["PretrainedError", "count_params", "create_model", "get_spec", "gradcam_target_layer",
           "list_models", "model_info"]
