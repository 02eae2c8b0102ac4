"""Video data: the folder dataset, the text-embedding store, synthetic data, samplers and the loader."""

from cosmos_train.data.check import DatasetReport, check_dataset
from cosmos_train.data.embeddings import EmbeddingStore, UnsafePickleError, convert_embeddings
from cosmos_train.data.loader import VideoLoader, build_dataloader
from cosmos_train.data.sampler import ConcatDatasets, GlobalStreamSampler, SampleRef, WeightedStreamSampler
from cosmos_train.data.synthetic import ensure_synthetic_dataset
from cosmos_train.data.video import VideoFolderDataset, probe_video, read_frames, write_mp4

__all__ = [
    "ConcatDatasets", "DatasetReport", "EmbeddingStore", "GlobalStreamSampler", "SampleRef",
    "UnsafePickleError", "VideoFolderDataset", "VideoLoader", "WeightedStreamSampler", "build_dataloader",
    "check_dataset", "convert_embeddings", "ensure_synthetic_dataset", "probe_video", "read_frames", "write_mp4",
]
