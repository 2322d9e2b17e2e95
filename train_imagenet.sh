#!/usr/bin/env bash
# Train an aft-timm model on ImageNet (or any ImageFolder dataset) with timm's own train.py and the DeiT recipe
# used by the AFT paper (arXiv:2105.14103). Run with --help for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: train_imagenet.sh [options] [-- extra train.py arguments]

Trains an aft-timm model with timm's unmodified train.py (reached through `--device-modules aft_timm`, which
registers the aft_* models) and the DeiT recipe of the AFT paper: AdamW, lr 5e-4 x global batch / 512 (linear
scaling), weight decay 0.05, cosine schedule with 5 warm-up epochs, label smoothing 0.1, drop-path 0.1,
RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25, repeated augmentation x3 (when more
than one process), model EMA, mixed precision.

Options (defaults in brackets):
  --model NAME        aft model to train [aft_conv_small_h384_k11_patch16_224]
  --data-dir DIR      dataset root with train/ and val/ (or validation/) class folders [$IMAGENET_DIR or ./imagenet]
  --batch-size N      batch size per GPU [128; 64 with --recipe finetune384]
  --epochs N          training epochs [300; 100 with --recipe finetune384]
  --output DIR        where timm writes checkpoints and logs [./output]
  --gpus N            GPUs per node [all GPUs nvidia-smi lists, else 1]
  --nnodes N          number of nodes [1]
  --node-rank R       rank of this node, 0..nnodes-1 [0]
  --master-addr HOST  address of the rank-0 node [127.0.0.1]
  --master-port PORT  port on the rank-0 node [29500]
  --num-classes N     classes of your dataset (the classifier is replaced when it differs from the checkpoint)
  --pretrained        start from the model's pretrained tag: for AFT-conv/AFT-simple, timm's DeiT weights
                      converted on load (paper Table 8); query/key projections and position terms stay fresh
  --recipe NAME       deit (train from scratch, paper Table 7) or finetune384 (paper Table 8: DeiT-base
                      warm start into aft_conv_base_h32_k25_patch16_384 at 384x384, 100 epochs, batch 64) [deit]
  --device DEV        cuda, or cpu for a smoke test (no AMP, one process) [cuda]
  --timm-dir DIR      a pytorch-image-models checkout holding train.py [$TIMM_TRAIN_PY, ./pytorch-image-models]
  --dry-run           print the command instead of running it
  -h, --help          this help

Everything after `--` goes to train.py unchanged (e.g. `-- --grad-accum-steps 2 --log-wandb`).

Examples:
  # ImageNet, one node with 8 GPUs (global batch 1024, lr 1e-3)
  ./train_imagenet.sh --model aft_conv_small_h384_k11_patch16_224 --data-dir /data/imagenet --gpus 8
  # two nodes with 8 GPUs each; run on every node with its own --node-rank
  ./train_imagenet.sh --gpus 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --data-dir /data/imagenet
  # paper Table 8: DeiT-base warm start, fine-tune AFT-conv base at 384
  ./train_imagenet.sh --recipe finetune384 --data-dir /data/imagenet --gpus 1
  # your own folder of images (train/<class>/*.jpg, val/<class>/*.jpg), 5 classes, DeiT warm start
  ./train_imagenet.sh --model aft_conv_tiny_h192_k11_patch16_224 --data-dir ~/flowers --num-classes 5 \
      --pretrained --epochs 30 --batch-size 64 --gpus 1

timm's train.py is not part of the timm wheel. Get the version that matches your installed timm:
  git clone --branch "v$(python -c 'import timm; print(timm.__version__)')" \
      https://github.com/huggingface/pytorch-image-models
then pass --timm-dir pytorch-image-models (or set TIMM_TRAIN_PY=/path/to/train.py).
EOF
}

die() {
  echo "train_imagenet.sh: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"
}

need_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

model="aft_conv_small_h384_k11_patch16_224"
model_set=0
data_dir="${IMAGENET_DIR:-./imagenet}"
batch_size=""
epochs=""
output="./output"
gpus=""
nnodes=1
node_rank=0
master_addr="127.0.0.1"
master_port=29500
num_classes=""
pretrained=0
recipe="deit"
device="cuda"
timm_dir=""
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) need_value "$@"; model="$2"; model_set=1; shift 2 ;;
    --data-dir) need_value "$@"; data_dir="$2"; shift 2 ;;
    --batch-size) need_value "$@"; need_int "$1" "$2"; batch_size="$2"; shift 2 ;;
    --epochs) need_value "$@"; need_int "$1" "$2"; epochs="$2"; shift 2 ;;
    --output) need_value "$@"; output="$2"; shift 2 ;;
    --gpus) need_value "$@"; need_int "$1" "$2"; gpus="$2"; shift 2 ;;
    --nnodes) need_value "$@"; need_int "$1" "$2"; nnodes="$2"; shift 2 ;;
    --node-rank) need_value "$@"; need_int "$1" "$2"; node_rank="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) need_value "$@"; need_int "$1" "$2"; master_port="$2"; shift 2 ;;
    --num-classes) need_value "$@"; need_int "$1" "$2"; num_classes="$2"; shift 2 ;;
    --pretrained) pretrained=1; shift ;;
    --recipe) need_value "$@"; recipe="$2"; shift 2 ;;
    --device) need_value "$@"; device="$2"; shift 2 ;;
    --timm-dir) need_value "$@"; timm_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (train.py options go after '--'; see --help)" ;;
  esac
done

case "$recipe" in
  deit)
    : "${epochs:=300}"
    : "${batch_size:=128}"
    ;;
  finetune384)
    # Paper Table 8: AFT-conv base (kernel 25, 32 heads) initialized from DeiT-base 384, 100 epochs, batch 64.
    [[ $model_set == 1 ]] || model="aft_conv_base_h32_k25_patch16_384"
    pretrained=1
    : "${epochs:=100}"
    : "${batch_size:=64}"
    ;;
  *) die "unknown --recipe '$recipe' (deit or finetune384)" ;;
esac
case "$device" in
  cuda|cpu) ;;
  *) die "--device must be cuda or cpu, got '$device'" ;;
esac
[[ "$model" == aft_* ]] || die "'$model' is not an aft-timm model (names start with aft_; list them with:" \
  "python -c \"import aft_timm, timm; print(timm.list_models('aft_*'))\")"
[[ "$batch_size" -gt 0 && "$epochs" -gt 0 && "$nnodes" -gt 0 ]] || die "--batch-size, --epochs and --nnodes must be > 0"
[[ "$node_rank" -lt "$nnodes" ]] || die "--node-rank $node_rank must be < --nnodes $nnodes"

if [[ -z "$gpus" ]]; then
  if [[ "$device" == cuda ]] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [[ -n "$gpus" && "$gpus" -gt 0 ]] || gpus=1
fi
[[ "$gpus" -gt 0 ]] || die "--gpus must be > 0"
if [[ "$device" == cpu ]]; then
  [[ "$gpus" == 1 && "$nnodes" == 1 ]] || die "--device cpu runs one process: drop --gpus/--nnodes"
fi
world_size=$((gpus * nnodes))

# timm's train.py: --timm-dir, then TIMM_TRAIN_PY, then a checkout in the current directory.
if [[ -n "$timm_dir" ]]; then
  train_py="$timm_dir/train.py"
elif [[ -n "${TIMM_TRAIN_PY:-}" ]]; then
  train_py="$TIMM_TRAIN_PY"
else
  train_py="./pytorch-image-models/train.py"
fi
if [[ ! -f "$train_py" ]]; then
  message="timm's train.py was not found at '$train_py'. It is not part of the timm wheel: clone the version that
matches your timm,
  git clone --branch \"v\$(python -c 'import timm; print(timm.__version__)')\" \\
      https://github.com/huggingface/pytorch-image-models
and pass --timm-dir pytorch-image-models (or set TIMM_TRAIN_PY=/path/to/train.py)."
  if [[ $dry_run == 1 ]]; then
    echo "train_imagenet.sh: warning: $message" >&2
  else
    die "$message"
  fi
fi

if [[ $dry_run == 0 ]]; then
  [[ -d "$data_dir" ]] || die "data directory '$data_dir' does not exist (set --data-dir or IMAGENET_DIR)"
  [[ -d "$data_dir/train" ]] ||
    die "'$data_dir' has no train/ folder (expected train/<class>/<image> and val/<class>/<image>)"
  [[ -d "$data_dir/val" || -d "$data_dir/validation" ]] || die "'$data_dir' has no val/ (or validation/) folder"
fi

python_bin="${PYTHON:-python}"
args=(
  --device-modules aft_timm
  --model "$model"
  --data-dir "$data_dir"
  --output "$output"
  --epochs "$epochs"
  --batch-size "$batch_size"
  --device "$device"
  --opt adamw --opt-eps 1e-8 --weight-decay 0.05
  --lr-base 5e-4 --lr-base-size 512 --lr-base-scale linear
  --sched cosine --warmup-epochs 5 --warmup-lr 1e-6 --min-lr 1e-5
  --smoothing 0.1 --drop-path 0.1
  --aa rand-m9-mstd0.5-inc1 --train-interpolation bicubic --color-jitter 0.3
  --mixup 0.8 --cutmix 1.0
  --reprob 0.25 --remode pixel --recount 1
  --model-ema --model-ema-decay 0.99996
)
if [[ "$world_size" -gt 1 ]]; then
  args+=(--aug-repeats 3)  # timm only supports repeated augmentation with more than one process
fi
if [[ "$device" == cuda ]]; then
  args+=(--amp --pin-mem --workers 8)
fi
[[ $pretrained == 1 ]] && args+=(--pretrained)
[[ -n "$num_classes" ]] && args+=(--num-classes "$num_classes")
args+=("${extra[@]+"${extra[@]}"}")

if [[ "$world_size" -eq 1 ]]; then
  cmd=("$python_bin" "$train_py")
elif [[ "$nnodes" -eq 1 ]]; then
  cmd=(torchrun --standalone --nnodes=1 --nproc_per_node="$gpus" "$train_py")
else
  cmd=(torchrun --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$gpus"
       --master_addr="$master_addr" --master_port="$master_port" "$train_py")
fi
cmd+=("${args[@]}")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
if [[ "${cmd[0]}" == torchrun ]] && ! command -v torchrun >/dev/null 2>&1; then
  cmd=("$python_bin" -m torch.distributed.run "${cmd[@]:1}")
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
