"""Defaults shared by every recipe. A recipe file overrides only what its paper table names."""

from __future__ import annotations

import os

import ml_collections

# The data and label files that ship beside the repository (../shared from the repository root).
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data")
AUDIOSET_LABELS = os.path.normpath(os.path.join(SHARED_DATA, "labels", "audioset_class_labels_indices.csv"))
SPEECHCOMMANDS_LABELS = os.path.normpath(os.path.join(SHARED_DATA, "labels",
                                                      "speechcommands_class_labels_indices.csv"))

# Dataset statistics of the normalised log-mel input, (fbank - mean) / (2 * std) (docs/BACKGROUND.md section 1.1).
AUDIOSET_STATS = (-4.2677393, 4.5689974)
ESC50_STATS = (-6.6268077, 5.358466)
SPEECHCOMMANDS_STATS = (-6.845978, 5.5654526)


def base_config() -> ml_collections.ConfigDict:
  """The upstream AST recipe skeleton: Kaldi front end, AST-base at stride 10, Adam, BCE."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Front end: torchaudio.compliance.kaldi.fbank options (names and units as torchaudio), then pad/cut to
  # `target_length` frames and normalise with (x - mean) / (2 * std).
  config.audio = ml_collections.ConfigDict(dict(
      sample_rate=16000,
      num_mel_bins=128,
      frame_length=25.0,  # ms
      frame_shift=10.0,  # ms
      window_type="hanning",
      low_freq=20.0,
      high_freq=0.0,  # <= 0: offset from Nyquist, as Kaldi
      preemphasis_coefficient=0.97,
      remove_dc_offset=True,
      dither=0.0,
      target_length=1024,  # frames
      mean=AUDIOSET_STATS[0],
      std=AUDIOSET_STATS[1],
      # none | avg | max: pool along time (kernel = stride = time_pool_factor) after normalisation, so the model
      # sees target_length // time_pool_factor frames (a coarse phase of multi-phase training sets these).
      time_pool="none",
      time_pool_factor=1,
  ))

  # Data: which source, how it is read, and the sampler. Paths are resolved relative to the working directory.
  config.data = ml_collections.ConfigDict(dict(
      source="demo",  # demo | folder | datafile | esc50 | speechcommands
      path="",  # root folder (folder, esc50, speechcommands)
      train_datafile="",  # datafile source: AST JSON datafiles
      eval_datafile="",
      label_csv="",  # index,mid,display_name
      split="",  # source-specific split name (folder: 'takes' or 'speaker'; esc50: fold number; ...)
      eval_split="test",  # speechcommands: 'validation' or 'test'
      fold=1,  # esc50: the held-out fold
      held_out="",  # folder/speaker split: the speaker held out
      num_train_examples=0,  # demo: size of the generated training set
      num_eval_examples=0,
      batch_size=12,
      eval_batch_size=0,  # 0: same as batch_size
      balanced_sampling=False,
      num_workers=0,  # Grain worker processes; 0 reads in the main process
      prefetch_buffer_size=2,
      cache_audio=False,  # keep decoded waveforms in host memory (small data sets)
      # error: one error listing every bad entry and file (python -m ast_jax.validate lists them too); skip:
      # train without them, counted per kind of problem (Sources.skipped)
      on_bad_audio="error",
      scan="header",  # header: check files' headers before training; decode: decode every file once; off
      max_channels=2,  # files with more channels are bad data; mono and stereo are averaged to mono
      sample_rates=(),  # the file rates a data set should have (others are bad data); (): any, resampled
  ))

  config.augment = ml_collections.ConfigDict(dict(
      mixup=0.0,  # probability of waveform mixup with a random partner
      mixup_alpha=10.0,  # lambda ~ Beta(alpha, alpha)
      freq_mask=0,  # max frequency-mask width (bins); one mask
      time_mask=0,  # max time-mask width (frames); one mask
      noise=False,  # fbank += U(0,1)[frames, mel_bins] * U(0,1) / 10 after normalisation
      roll=0,  # then roll time by an integer in [-roll, roll) (upstream Speech Commands: 10, with noise)
  ))

  config.model = ml_collections.ConfigDict(dict(
      name="ast",
      variant="base",  # tiny | small | base, or set width/depth/num_heads below
      width=0,
      depth=0,
      num_heads=0,
      mlp_ratio=4,
      patch_size=16,
      fstride=10,
      tstride=10,
      dropout=0.0,
      attention_dropout=0.0,
      dtype="float32",  # compute dtype: float32 | bfloat16 (parameters and optimiser state stay float32)
      attention="auto",  # auto | xla | blockwise | splash | cudnn: ast_jax/models/attention.py (auto: per platform)
      remat="none",  # rematerialise each block: none | full | dots (keep matmul outputs) | dots_no_batch
      scan_layers=False,  # nn.scan over the blocks: one compiled block, stacked [depth, ...] parameters
      layer_norm_eps=1e-6,  # backbone LayerNorms (timm); Hugging Face checkpoints use 1e-12 everywhere
      head_layer_norm_eps=1e-5,  # the classifier's LayerNorm (PyTorch's default upstream)
      # FlexiAST (docs/BACKGROUND.md section 3): train with a patch size drawn per step from this list
      # (non-overlapping patches, strides = patch_size; the stored kernel is PI-resized to each size); empty: one
      # patch size.
      flexi_patch_sizes=(),
      flexi_axes="both",  # both: square p x p patches; time: patch_size bins x p frames
      flexi_patch_weights=(),  # relative probability of each of flexi_patch_sizes per step; empty: uniform
      # Steps at a drawn size other than the stored one also take the loss at the stored size, with this weight
      # (0: off; 0.5: the two losses averaged, as the "sandwich" of weight-sharing networks).
      flexi_base_weight=0.0,
      flexi_distill=False,  # with flexi_base_weight: the drawn size learns the stored size's own predictions
      # (frequency, time): train and evaluate the stored kernel at this patch shape (PI-resized, strides scaled
      # with it, positional grid resized); empty: the stored shape. A 'patch' training phase sets it.
      run_patch=(),
  ))
  # Weights to start from instead of a random initialisation: 'imagenet:/path' (timm DeiT/ViT .pth/.npz/
  # .safetensors), 'original:/path.pth' (upstream AST), 'hf:/dir' (ASTForAudioClassification), 'ast_jax:/dir'.
  config.init_from = ""
  config.num_classes = 527

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-5,
      b1=0.95,
      b2=0.999,
      eps=1e-8,
      weight_decay=5e-7,
      weight_decay_mode="l2",  # l2: added to the gradient, as torch.optim.Adam; decoupled: AdamW
      schedule="step",  # step: upstream warm-up + per-epoch step decay; cosine
      warmup_steps=1000,
      warmup_every=50,  # upstream raises the warm-up lr every 50 steps
      decay_start_epoch=2,
      decay_every=1,
      decay_factor=0.5,
      min_lr_ratio=0.0,  # cosine: final lr / peak lr
      grad_clip_norm=0.0,  # 0: off
  ))

  config.train = ml_collections.ConfigDict(dict(
      epochs=5,
      loss="bce",  # bce | ce
      main_metric="mAP",
      label_smoothing=0.0,
      average_weights=(0, 0),  # (first, last) epoch, 1-based and inclusive; (0, 0): off
      checkpoint_every_steps=0,  # 0: once per epoch
      keep_checkpoints=3,
      log_every_steps=50,
      eval_every_epochs=1,
      progress_bar=True,
      tensorboard=True,
      max_steps=0,  # > 0: stop after this many steps (the schedule stays the full run's); 0: run every epoch
      grad_accum_steps=1,  # split each batch into this many micro-batches, one update per batch
      # A step whose loss or gradient is not finite updates nothing (counted in skipped_steps); this many in a row
      # stop the run with the last checkpoint intact. 0: never stop.
      max_consecutive_skips=10,
      # Multi-phase coarse-to-fine training (ast_jax/train/phases.py): 'method:factor:epochs[:optim_field=value]'
      # phases separated by commas, e.g. 'avg_pool:2:20, full:1:10'; methods full, frame_shift, avg_pool,
      # max_pool, patch. The epochs add up to train.epochs. Empty: one phase at full resolution.
      phases="",
      peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: look the device kind up (ast_jax/train/throughput.py)
  ))

  # Evaluation sweeps after training (and `python -m ast_jax.sweep`): the final model evaluated with clips capped
  # at each length (frames at the base frame shift) and framed at each resolution q (frame shift 10 * q ms);
  # a table and a plot go to <workdir>/sweep.*. Empty: no sweep.
  config.eval_sweep = ml_collections.ConfigDict(dict(lengths=(), resolutions=()))
  # An AST with non-overlapping patches evaluated at each of these patch sizes (FlexiAST; models/flexi.py), into
  # the same sweep table and plot, e.g. --config.eval_patch_sizes=8,10,12,16,20,24,32.
  config.eval_patch_sizes = ()

  # Parallelism is configuration: a mesh of named axes (-1: every remaining device) and a table mapping the
  # logical axis names carried by parameters and activations to mesh axes (ast_jax/parallel/sharding.py).
  # The default is FSDP over `fsdp` and Megatron tensor parallelism over `tensor` (heads and MLP columns).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # The batch on many devices (ast_jax/train/batch_scaling.py): where the recipe's global batch does not split over
  # the data-parallel devices, train on `per_device` clips (packed input: rows) per device, the lr scaled by
  # `lr_rule` (sqrt | linear | none), the warm-up kept in examples but at least `min_warmup_steps`. 0: stop instead.
  config.batch_scaling = ml_collections.ConfigDict(dict(per_device=0, lr_rule="sqrt", min_warmup_steps=200))
  config.sharding_rules = (
      # Activations. `batch` also places every input batch: its leading dimension split over these axes.
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      # Parameters.
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),  # attention kernels are per head: q, k and v of a head stay on one device
      ("norm", None),
      ("classes", None),
      ("layers", None),
  )
  return config


def elastic(config: ml_collections.ConfigDict, **packing) -> ml_collections.ConfigDict:
  """Turns a recipe into ElasticAST (docs/BACKGROUND.md section 2): the same ViT backbone on clips of their own
  length packed into rows of `row_tokens` tokens, non-overlapping patches with factorised frequency/time positions,
  attention masked to each clip, and one pooled output per clip. `packing` overrides `packed_rows`'s fields."""
  config.model.update(name="elastic", fstride=config.model.patch_size,
                      tstride=config.model.get("patch_time") or config.model.patch_size)
  config.model.patch_time = config.model.get("patch_time", 0)  # > 0: rectangular patches, this many frames
  config.model.pooling = "attention"  # attention: a learned query per clip; mean: masked mean of its tokens
  config.model.positions = "integer"  # integer: in-clip patch index; fractional: any length spans the table
  config.model.scale_logits = True  # False: upstream's unscaled attention logits (for its released weights)
  config.model.max_time_patches = 0  # time-table rows; 0: packing.max_frames // patch_size
  return packed_rows(config, **packing)


def packed_rows(config: ml_collections.ConfigDict, **packing) -> ml_collections.ConfigDict:
  """Trains and evaluates the recipe's model on rows of `row_tokens` tokens packed with whole clips of their own
  length (ElasticAST's input; AuM takes it too, with a CLS token and a fresh scan state per clip). `packing`
  overrides the fields below."""
  config.packing = ml_collections.ConfigDict(dict(
      rows=8,  # rows per global batch (split over the data-parallel devices)
      eval_rows=0,  # 0: rows
      row_tokens=2048,
      max_clips=16,  # clips per row at most (the per-clip outputs of a row)
      method="best_fit",  # first_fit | best_fit
      drop_rate=0.1,  # token dropout in training, decided when packing
      max_frames=1024,  # clips are cut to this duration (frames at the base frame shift): T_max
      resolutions=(1.0,),  # q per clip, drawn each epoch: frame shift audio.frame_shift * q (upstream: 1.0 ... 4.0)
      crop="start",  # where a longer clip is cut: start | random
      min_crop_frames=0,  # > 0: every training clip cropped to a random length of at least this many frames
  ))
  config.packing.update(packing)
  config.augment.update(mixup=0.0, roll=0)  # whole clips of their own length: no waveform mixup, no time roll
  return config


def aum(config: ml_collections.ConfigDict, variant: str = "base", **model) -> ml_collections.ConfigDict:
  """Turns a recipe into Audio Mamba (docs/BACKGROUND.md section 5): the AuM backbone (24 bidirectional Mamba layers, no
  attention) in place of the ViT, on upstream's non-overlapping 16x16 patches; data, front end, augmentation,
  optimiser and trainer stay the recipe's. `model` overrides the fields below."""
  config.model.update(name="aum", variant=variant, width=0, depth=0, fstride=16, tstride=16)
  config.model.bidirectional = "fo_bi"  # fo_bi (upstream's base) | bi_bi (Vision Mamba) | fo_fo
  config.model.cls_position = "middle"  # middle (N // 2) | head | tail | head_tail | none (mean pooling)
  config.model.d_state = 16
  config.model.d_conv = 4
  config.model.expand = 2
  config.model.dt_rank = 0  # 0: ceil(width / 16)
  config.model.norm_eps = 1e-5
  # Selective scan implementation (models/ssm.py): auto (recompute on CPU, pallas on TPU, chunked on GPU) |
  # sequential | associative | chunked | recompute | pallas (the Mosaic kernel, models/ssm_pallas.py).
  config.model.scan = "auto"
  config.model.scan_chunk = 128
  config.model.max_time_patches = 0  # packed rows (packed_rows(config)): time-table rows; 0: packing.max_frames // 16
  config.model.update(model)
  return config


def shrink_for_smoke_test(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same recipe (data format, front end, augmentation, loss, schedule) with a tiny model and batch, for a
  two-step check on a CPU. `get_config('smoke')` of every recipe returns this."""
  config.model.update(variant="", width=64, depth=2, num_heads=2)
  config.data.update(batch_size=2, eval_batch_size=2, num_workers=0, scan="header")
  config.train.update(epochs=1, log_every_steps=1, progress_bar=False, tensorboard=False)
  if "packing" in config:
    config.packing.update(rows=2, eval_rows=2)
  first, last = config.train.average_weights
  if first:
    config.train.average_weights = (1, 1)
  return config
