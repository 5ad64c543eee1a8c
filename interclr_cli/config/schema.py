"""The configuration schema: one typed tree shared by every command.

Every key a preset or a ``key=value`` override may set is a field here; the type annotation is
what an override string is parsed into (see :mod:`interclr_cli.config.loader`, which parses the
presets and the overrides). A ``Literal[...]`` type is the one list of a key's allowed values: the
loader checks values against it, ``interclr presets keys`` prints it, and other code reads it with
:func:`interclr_cli.config.loader.choices` (or ``typing.get_args`` of the named types below) instead
of keeping its own list.

Sections are shared between commands: ``pretrain`` reads ``data``, ``model``, ``method``,
``optim``, ``train`` and ``monitor``; ``linear-eval`` and ``finetune`` read ``data``, ``optim``,
``train`` and ``eval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The keys with a fixed set of values (named where other modules read them).
Source = Literal["auto", "imagefolder", "folder", "filelist"]
AugmentOn = Literal["auto", "workers", "device"]
Decode = Literal["auto", "pil", "device"]
Arch = Literal["resnet18", "resnet34", "resnet50"]
MethodName = Literal["mocov2", "interclr", "npid", "invp"]
InvpRamp = Literal["binary", "gaussian", "none"]
KeyBN = Literal["none", "split", "shuffle", "sync"]
IntraKind = Literal["moco", "npid"]
MarginType = Literal["additive", "angular"]
NegSampling = Literal["semihard", "hard", "random", "semieasy"]
PoolThreshold = Literal["exact", "sampled"]
LabelMode = Literal["online", "offline"]
BankDtype = Literal["float32", "bfloat16"]
OptimName = Literal["sgd", "lars"]
Schedule = Literal["cosine", "step", "constant"]
Precision = Literal["auto", "none", "bf16"]
# A switch whose default is decided per machine (interclr_cli.runtime.precision); YAML true/false
# and the command line's true/false/yes/no/on/off/1/0 are read as "true"/"false".
AutoSwitch = Literal["auto", "true", "false"]
KnnSplit = Literal["auto", "holdout", "train"]
Protocol = Literal["linear", "finetune"]
# `interclr invariance`: the augmentation families (data/invariance.py) and the layers measured.
InvarianceFamily = Literal["crop", "occlusion", "colour", "flip", "blur", "grayscale", "rotation"]
InvarianceLayer = Literal["backbone", "embedding", "layer1", "layer2", "layer3"]


@dataclass
class DataConfig:
    # A folder (ImageFolder tree or flat folder of images), a text file list, or builtin:NAME.
    root: str = "builtin:cifar10-mini"
    # Evaluation commands: labelled train/val trees. Empty means <root>/train and <root>/val|test.
    train: str = ""
    val: str = ""
    # How root is indexed; auto detects it (see interclr_cli.data.sources).
    source: Source = "auto"
    image_size: int = 224
    # Evaluation transform: resize to this size, then centre-crop image_size (MoCo: 256 -> 224).
    eval_resize: int = 256
    crop_min_scale: float = 0.2
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # MoCo v2 augmentation switches (probabilities; 0 disables).
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    # Where pretraining augments: "workers" (every step in the DataLoader workers, PIL) or
    # "device" (workers crop and flip; colour, grayscale, blur and normalisation run batched on
    # the training device: frees the CPU for a fast GPU, or for the model on a small CPU).
    # auto: device on CUDA (and where data.in_memory or data.decode=device need it), workers on the CPU.
    augment_on: AugmentOn = "auto"
    # Who decodes pretraining images: "pil" (the DataLoader workers) or "device" (the workers only
    # read the files; each batch's JPEGs are decoded on the training device, nvjpeg on CUDA, and
    # cropped there; other formats fall back to PIL in the workers). device needs augment_on=device.
    # auto: device on CUDA with augment_on=device and JPEG data, pil otherwise (and on the CPU).
    decode: Decode = "auto"
    # Decode every image once and keep the pixels on the training device (needs augment_on=device
    # and images of one size, e.g. CIFAR: 150 MB); steps then need no decoding or workers.
    in_memory: bool = False
    # Draw training samples with replacement (the InterCLR reference sampler) or as a permutation.
    replacement: bool = False
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # finetune: a stratified, seeded fraction of the labelled training set, or a list of file names.
    label_fraction: float = 1.0
    label_list: str = ""


@dataclass
class ModelConfig:
    arch: Arch = "resnet50"
    # 3x3 stride-1 conv1 and no max-pool, for 32-96 px images.
    small_stem: bool = False
    # Projection head: Linear(feat, hidden) - ReLU - Linear(hidden, embed_dim). 0 = feature width.
    head_hidden: int = 0
    embed_dim: int = 128
    sync_bn: bool = False


@dataclass
class IntraConfig:
    # The intra-image branch; also MoCo v2's whole loss when method.name=mocov2.
    # moco: InfoNCE of q against its key and the queue. npid: against the memory bank.
    kind: IntraKind = "moco"
    margin: float = 0.0
    temperature: float = 0.2
    weight: float = 0.75
    # npid only
    npid_temperature: float = 0.07
    npid_negatives: int = 16384
    npid_bank_momentum: float = 0.5


@dataclass
class InterConfig:
    weight: float = 0.25
    temperature: float = 0.2
    margin: float = -0.5
    # additive: cos(q,p) - m.  angular: cos(theta + m) (ArcFace-style).
    margin_type: MarginType = "additive"
    num_clusters: int = 10000
    # Negatives with another pseudo-label (see interclr_cli.memory.sampling): semihard/semieasy
    # draw from the pool of the most/least similar entries, hard takes the most similar, random
    # draws from the whole bank.
    neg_sampling: NegSampling = "semihard"
    num_negatives: int = 16384
    # The nearest-neighbour pool for semihard/semieasy: a count, or (if > 0) a fraction of N.
    pool_size: int = 128000
    pool_fraction: float = 0.0
    # exact: the pool is a topk(P, sorted=False) selection over the full similarity row.
    # sampled: the pool is every entry past a threshold, the P-th largest (semieasy: smallest)
    # similarity estimated from pool_sample random columns; skips the O(N) selection per row
    # (see interclr_cli.memory.sampling for how the two pools differ).
    pool_threshold: PoolThreshold = "exact"
    pool_sample: int = 16384
    # Pseudo-labels: updated online every step, or re-clustered offline (k-means) every
    # recluster_every epochs.
    labels: LabelMode = "online"
    recluster_every: int = 1
    centroid_update_every: int = 10
    min_cluster_size: int = 20
    bank_momentum: float = 1.0
    # Storage dtype of the memory bank (bfloat16 halves its memory).
    bank_dtype: BankDtype = "float32"
    warmup_epochs: int = 0
    kmeans_iters: int = 20
    kmeans_gpu: bool = True


@dataclass
class NpidConfig:
    # method.name=npid (Wu et al., arXiv 1805.01978): InfoNCE of a query against its own bank row
    # and num_negatives uniformly drawn rows (0 = every row: the full non-parametric softmax).
    temperature: float = 0.07
    num_negatives: int = 4096
    # v_i <- normalize((1 - m) v_i + m q_i); the paper's 0.5
    bank_momentum: float = 0.5
    bank_dtype: BankDtype = "float32"


@dataclass
class InvpConfig:
    # method.name=invp (Wang et al., arXiv 2010.11694): an NPID bank, each image's k nearest rows
    # kept in an N x k table; positives = the n_pos least similar of the k + k^2 + ... + k^depth
    # images reached by propagating over that table; negatives = the num_background most similar.
    temperature: float = 0.2
    num_background: int = 4096
    k: int = 4
    depth: int = 3
    n_pos: int = 50
    # remove repeated candidates before picking the hardest (the official code keeps them)
    dedup: bool = False
    # L = L_instance + weight * r(epoch) * L_invariance; r: binary (0 before ramp_epochs, then 1),
    # gaussian (exp(-5 (1 - e / ramp_epochs)^2)) or none (1)
    weight: float = 0.6
    ramp: InvpRamp = "binary"
    ramp_epochs: int = 30
    bank_momentum: float = 0.5
    bank_dtype: BankDtype = "float32"


@dataclass
class CLDConfig:
    # Cross-level instance-group discrimination (Wang, Liu, Yu, arXiv 2008.03813) as an add-on
    # loss for mocov2, npid and interclr: L = L_method + weight * L_CLD (0 = off).
    weight: float = 0.0
    temperature: float = 0.2
    # k-means of each view's group features over the (all-gathered) batch: K and iterations
    num_clusters: int = 128
    kmeans_iters: int = 5
    # group head: normalised linear (the paper's NormLinear/NormMLP) or plain linear
    normlinear: bool = True
    dim: int = 128


@dataclass
class MethodConfig:
    name: MethodName = "mocov2"
    momentum: float = 0.999
    queue_size: int = 65536
    # BatchNorm of the key encoder, so that a query and its key never share batch statistics
    # (MoCo Sec. 3.3). split: on every process, both encoders normalise in key_bn_groups groups and
    # the key batch is shuffled first (MoCo's single-GPU demo; G groups emulate G devices).
    # shuffle: the key batch is shuffled across processes (MoCo's shuffle-BN; on one process it
    # runs as split). sync: SyncBatchNorm in the key encoder. none: per-device BN (leaks).
    key_bn: KeyBN = "split"
    # Groups of split: at most this many, fewer where the per-process batch is small (every group
    # keeps >= 16 images; under 32 images per process BatchNorm is not split; see
    # interclr_cli.models.split_bn.split_groups).
    key_bn_groups: int = 8
    intra: IntraConfig = field(default_factory=IntraConfig)
    inter: InterConfig = field(default_factory=InterConfig)
    npid: NpidConfig = field(default_factory=NpidConfig)
    invp: InvpConfig = field(default_factory=InvpConfig)
    cld: CLDConfig = field(default_factory=CLDConfig)


@dataclass
class OptimConfig:
    name: OptimName = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    # step: multiply by gamma at each of milestones (epochs).
    schedule: Schedule = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float = 0.0
    # finetune: the new head's learning rate is lr * head_lr_mult.
    head_lr_mult: float = 1.0
    # lr is given for this global batch; scaled linearly with the actual global batch. 0 = no scaling.
    reference_batch: int = 0


@dataclass
class TrainConfig:
    epochs: int = 200
    # Images per process and step. Ignored when global_batch > 0.
    batch_size: int = 256
    # Images per step over all processes (> 0): each process takes global_batch / world, so a
    # preset means the same run on 1, 2, 8 or 16 GPUs. 0: batch_size per process.
    global_batch: int = 0
    # Stop after this many optimizer steps in total (0 = no limit); for smoke tests.
    max_steps: int = 0
    # bf16: autocast to bfloat16; none: float32. auto: bf16 on a GPU with native bf16 and on a CPU
    # with AVX-512 bf16 or AMX, float32 otherwise (README "Precision"). A run's config.yaml records
    # the resolved value.
    precision: Precision = "auto"
    # NHWC tensors. auto: true on CUDA and on a CPU with AVX-512, false otherwise (recorded resolved).
    channels_last: AutoSwitch = "auto"
    # CUDA only (ignored on the CPU): cuDNN's convolution autotuner, and TF32 matmuls/convolutions.
    cudnn_benchmark: bool = True
    tf32: bool = True
    compile: bool = False
    log_every: int = 10
    # Checkpoint every N epochs and every M steps (0: never; always at the end), keeping the last K.
    ckpt_every: int = 1
    ckpt_every_steps: int = 0
    keep_last: int = 3


@dataclass
class MonitorConfig:
    # Evaluate the label-free and kNN monitors every N epochs (0 = never), and before training.
    every: int = 1
    at_start: bool = True
    rankme: bool = True
    rankme_samples: int = 25600
    knn: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.07
    # holdout: a held-out labelled split (<root>/../test or data.val); train: a split of the train set;
    # auto: holdout when such a split exists, else train.
    knn_split: KnnSplit = "auto"
    knn_max_train: int = 10000
    knn_max_val: int = 2000


@dataclass
class EvalConfig:
    protocol: Protocol = "linear"
    cached_features: bool = False
    cached_aug_copies: int = 0
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    feature_batch_size: int = 256
    # Feature extraction (monitors, knn, linear-eval, ...): auto = the resolved train.precision.
    precision: Precision = "auto"


@dataclass
class LogConfig:
    # TensorBoard event files in <run>/tensorboard/ from the training loop (pretrain, finetune,
    # linear-eval), when the tensorboard package is installed (pip install 'interclr[viz]').
    tensorboard: bool = True


@dataclass
class InvarianceConfig:
    # `interclr invariance` (firing-rate invariance score, Goodfellow et al. 2009 as used by
    # Purushwalkam & Gupta, arXiv 2007.13916). augment: the families whose views of data.root's
    # images form the sets; sets: a CSV file path,set_id[,label] of the user's own sets ("" = none).
    augment: list[InvarianceFamily] = field(
        default_factory=lambda: ["crop", "occlusion", "colour", "flip", "blur", "grayscale", "rotation"]
    )
    sets: str = ""
    images: int = 1000  # images of data.root (a seeded subset) for the augmentation families
    views: int = 8  # views per image and family, the untransformed image included (flip, grayscale: 2)
    layer: InvarianceLayer = "backbone"
    firing_rate: float = 0.05  # the fraction of all images on which each unit fires: G(i)
    top_k: int = 25  # the score is the mean invariance of the k most invariant units


@dataclass
class Config:
    name: str = ""
    description: str = ""
    seed: int = 0
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
