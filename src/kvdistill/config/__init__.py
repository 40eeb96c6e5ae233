"""kvdistill.config: the typed run configuration (`schema`) and how it is read, overridden and checked (`load`)."""

from kvdistill.config.load import (
    apply_overrides,
    check_config,
    config_path,
    dump_config,
    load_config,
    merge_data,
    packaged_file,
    parse_config,
    read_raw,
    resolve_paths,
    resolved_dict,
    semantic_problems,
)
from kvdistill.config.schema import (
    CompressionConfig,
    DataConfig,
    EntropyConfig,
    FusionConfig,
    KVLossConfig,
    LatentConfig,
    LatentLosses,
    LayerMapConfig,
    LogitKDConfig,
    LoraConfig,
    RouterConfig,
    RunConfig,
    Section,
    SimilarityConfig,
    StudentConfig,
    TeacherConfig,
    TextLosses,
    TrainConfig,
)

__all__ = ["CompressionConfig", "DataConfig", "EntropyConfig", "FusionConfig", "KVLossConfig", "LatentConfig",
           "LatentLosses", "LayerMapConfig", "LogitKDConfig", "LoraConfig", "RouterConfig", "RunConfig", "Section",
           "SimilarityConfig", "StudentConfig", "TeacherConfig", "TextLosses", "TrainConfig", "apply_overrides", "check_config",
           "config_path", "dump_config", "load_config", "merge_data", "packaged_file", "parse_config", "read_raw", "resolve_paths",
           "resolved_dict", "semantic_problems"]
