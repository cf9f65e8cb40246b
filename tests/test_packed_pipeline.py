"""Packed batches from the demo source: fixed shapes, every clip once per epoch, a batch is a function of its
position (so restoring the position restores the stream), and slots hold the clips' own waveforms."""

import numpy as np

from ast_jax.data.demo import demo_sources
from ast_jax.data.packed import PackedBatches, PackedPlans, PackingSpec, clip_lengths
from ast_jax.data.reader import WaveformReader
from ast_jax.data.sampling import EpochSampler

SPEC = PackingSpec(rows=2, row_tokens=96, max_clips=8, mel_bins=64, max_frames=128, drop_rate=0.1)


def setup(seed=0, num_train=40):
  sources = demo_sources(seed, num_train, 8)
  lengths = clip_lengths(sources.train, SPEC.sample_rate)
  plans = PackedPlans(lengths, EpochSampler(len(sources.train), seed), SPEC)
  reader = WaveformReader(sources.train, SPEC.sample_rate)
  batches = PackedBatches(plans, reader, [e.labels for e in sources.train], 8, seed)
  return sources, lengths, plans, reader, batches


def test_every_clip_once_per_epoch_with_fixed_shapes():
  sources, lengths, plans, _, batches = setup()
  assert len(set(lengths.tolist())) > 5  # the demo clips have natural, different lengths
  first_epoch = plans.epoch(0)
  count = len(first_epoch)
  seen = []
  for position in range(count):
    batch = batches(position)
    assert batch["waveform"].shape == (2, 8, SPEC.max_samples) and batch["segment_ids"].shape == (2, 96)
    seen += batch["index"][batch["clip_mask"] > 0].tolist()
    # tokens per row: each clip's kept tokens, within budget
    for row in range(2):
      for slot in range(8):
        tokens = int((batch["segment_ids"][row] == slot + 1).sum())
        assert (tokens > 0) == (batch["clip_mask"][row, slot] > 0)
  assert sorted(seen) == list(range(len(sources.train)))
  assert plans.locate(count) == (1, 0)  # the next position starts epoch 1


def test_batch_is_a_function_of_its_position():
  *_, batches = setup()
  *_, fresh = setup()  # a restarted process: new objects, same config
  for position in (0, 3, 11):
    a, b = batches(position), fresh(position)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_slots_hold_the_clips_waveforms():
  _, lengths, _, reader, batches = setup()
  batch = batches(1)
  row, slot = np.argwhere(batch["clip_mask"] > 0)[0]
  clip = batch["index"][row, slot]
  waveform = reader.decode(clip)[:SPEC.max_samples]
  assert batch["num_samples"][row, slot] == len(waveform) == min(lengths[clip], SPEC.max_samples)
  np.testing.assert_array_equal(batch["waveform"][row, slot, :len(waveform)], waveform)
  assert np.all(batch["waveform"][row, slot, len(waveform):] == 0)


def test_elastic_ast_learns_from_packed_demo_batches():
  import flax.linen as nn
  import jax
  import optax

  from ast_jax.models.elastic import ElasticAST
  from ast_jax.train.state import create_train_state
  from ast_jax.train.steps import make_packed_train_step, packed_patches
  from configs import demo

  config = demo.get_config()
  config.audio.update(target_length=SPEC.max_frames, num_mel_bins=SPEC.mel_bins)
  config.augment.update(freq_mask=0, time_mask=0)
  spec = PackingSpec(rows=4, row_tokens=128, max_clips=8, mel_bins=64, max_frames=128)
  sources = demo_sources(0, 160, 8)
  plans = PackedPlans(clip_lengths(sources.train, 16000), EpochSampler(len(sources.train), 0), spec)
  batches = PackedBatches(plans, WaveformReader(sources.train, 16000), [e.labels for e in sources.train], 8, 0)
  model = ElasticAST(num_classes=8, width=64, depth=2, num_heads=2, max_freq_patches=4, max_time_patches=8,
                     max_clips=8)
  first = batches(0)
  patches = packed_patches(first, config.audio.to_dict(), 16)
  params = nn.meta.unbox(model.init(jax.random.key(0), patches, first["segment_ids"], first["freq_positions"],
                                    first["time_positions"])["params"])
  tx = optax.adamw(1e-3)
  state = create_train_state(params, tx, False)
  step = jax.jit(make_packed_train_step(model, tx, lambda count: 1e-3, config, jax.random.key(1)))
  losses = []
  for position in range(60):
    state, metrics = step(state, batches(position % len(plans.epoch(0))))
    losses.append(float(metrics["loss"]))
  assert float(metrics["packing_efficiency"]) > 0.8
  assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses  # chance is ln 8 = 2.08

  # Evaluation: per-clip softmax scores for real clips; the loss sum covers exactly those clips.
  from ast_jax.train.steps import make_packed_eval_step

  evaluated = jax.jit(make_packed_eval_step(model, config))(state.params, first)
  real = first["clip_mask"] > 0
  scores = np.asarray(evaluated["scores"])
  assert scores.shape == (4, 8, 8) and np.allclose(scores[real].sum(-1), 1.0, atol=1e-5)
  labels = first["label"][real].argmax(-1)
  expected = -np.log(scores[real][np.arange(len(labels)), labels]).sum()
  np.testing.assert_allclose(float(evaluated["loss_sum"]), expected, rtol=1e-4)


def test_grain_iterator_restores_and_hosts_split_rows():
  from ast_jax.data.packed import packed_train_iterator

  sources = demo_sources(0, 40, 8)
  labels = [e.labels for e in sources.train]
  stream = packed_train_iterator(sources.train, labels, 8, SPEC, seed=0)
  [next(stream) for _ in range(3)]
  state = stream.get_state()
  expected = next(stream)
  again = packed_train_iterator(sources.train, labels, 8, SPEC, seed=0)
  again.set_state(state)
  restored = next(again)
  for key in expected:
    np.testing.assert_array_equal(restored[key], expected[key], err_msg=key)
  hosts = [packed_train_iterator(sources.train, labels, 8, SPEC, seed=0, shard_index=h, shard_count=2)
           for h in range(2)]
  whole = packed_train_iterator(sources.train, labels, 8, SPEC, seed=0)
  for _ in range(2):
    full, parts = next(whole), [next(host) for host in hosts]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), full[key], err_msg=key)
