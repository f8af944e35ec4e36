"""Data curation: cleaning, exact and near-duplicate removal, quality filtering, mixtures.
Every step is a library function over documents (`{"id", "text", ...}` dicts); `lmlab data
clean|dedup|filter|mix|curate` are thin wrappers. See docs/curation.md."""
from lmlab.data.curate.classifier import QualityClassifier, TrainConfig, train_classifier
from lmlab.data.curate.clean import CleanConfig, clean_documents
from lmlab.data.curate.dedup import DedupConfig, dedup_documents, plan_dedup
from lmlab.data.curate.documents import iterate, read_documents, write_documents
from lmlab.data.curate.minhash import MinHasher, estimate_jaccard, jaccard, lsh_params, shingles
from lmlab.data.curate.learned import LearnedFilterConfig, filter_learned
from lmlab.data.curate.mixture import MixtureSource, mix
from lmlab.data.curate.noise import NoiseConfig, inject_noise
from lmlab.data.curate.pipeline import CurateConfig, curate, curate_config
from lmlab.data.curate.quality import QualityConfig, filter_quality, quality_rule
from lmlab.data.curate.report import CurationReport, StepReport

__all__ = [
    "CleanConfig", "CurateConfig", "CurationReport", "DedupConfig", "LearnedFilterConfig", "MinHasher",
    "MixtureSource", "NoiseConfig", "QualityClassifier", "QualityConfig", "StepReport", "TrainConfig",
    "clean_documents", "curate", "curate_config", "dedup_documents", "estimate_jaccard", "filter_learned",
    "filter_quality", "inject_noise", "iterate", "jaccard", "lsh_params", "mix", "plan_dedup", "quality_rule",
    "read_documents", "shingles", "train_classifier", "write_documents",
]
