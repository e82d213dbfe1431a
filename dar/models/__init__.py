from dar.models.sit import (
    ARCH_NAMES,
    ModelConfig,
    ProjectorConfig,
    SiT,
    build_model,
    count_parameters,
    load_official_sit_state_dict,
)

__all__ = ["ARCH_NAMES", "ModelConfig", "ProjectorConfig", "SiT", "build_model", "count_parameters", "load_official_sit_state_dict"]
