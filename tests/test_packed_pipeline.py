"""Packed batches from the demo source: fixed shapes, every clip once per epoch, a batch is a function of its
position (so restoring the position restores the stream), slots hold the clips' own waveforms, each host decodes
only the clips of its own rows, and evaluation is planned once per length cap and resolution."""

import numpy as np
import pytest

from ast_jax.data.demo import demo_sources
from ast_jax.data.packed_batches import PackedBatches, PackedPlans, PackingSpec, clip_lengths
from ast_jax.data.reader import WaveformReader
from ast_jax.data.sampling import EpochSampler

SPEC = PackingSpec(rows=2, row_tokens=96, max_clips=8, mel_bins=64, max_frames=128, drop_rate=0.1)


def setup(seed=0, num_train=40):
  sources = demo_sources(seed, num_train, 8)
  lengths = clip_lengths(sources.train, SPEC.sample_rate)
  plans = PackedPlans(lengths, EpochSampler(len(sources.train), seed), SPEC, seed)
  reader = WaveformReader(sources.train, SPEC.sample_rate)
  batches = PackedBatches(plans, reader, [e.labels for e in sources.train], 8, seed)
  return sources, lengths, plans, reader, batches


def test_every_clip_once_per_epoch_with_fixed_shapes():
  sources, lengths, plans, _, batches = setup()
  assert len(set(lengths.tolist())) > 5  # the demo clips have natural, different lengths
  count = len(plans.epoch(0).batches)
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


@pytest.mark.slow  # 11 s; the slow FSDD ElasticAST acceptance run and test_elastic_train cover training too
def test_elastic_ast_learns_from_packed_demo_batches():
  import flax.linen as nn
  import jax
  import optax

  from ast_jax.models.elastic import ElasticAST
  from ast_jax.train.state import create_train_state
  from ast_jax.models.tokens import TokenLayout
  from ast_jax.train.steps import batch_input, make_eval_step, make_train_step
  from configs import demo

  config = demo.get_config()
  config.audio.update(target_length=SPEC.max_frames, num_mel_bins=SPEC.mel_bins)
  config.augment.update(freq_mask=0, time_mask=0)
  spec = PackingSpec(rows=4, row_tokens=128, max_clips=8, mel_bins=64, max_frames=128)
  sources = demo_sources(0, 160, 8)
  plans = PackedPlans(clip_lengths(sources.train, 16000), EpochSampler(len(sources.train), 0), spec, 0)
  batches = PackedBatches(plans, WaveformReader(sources.train, 16000), [e.labels for e in sources.train], 8, 0)
  model = ElasticAST(num_classes=8, width=64, depth=2, num_heads=2, max_freq_patches=4, max_time_patches=8)
  first = batches(0)
  spectrogram, layout = batch_input(first, config.audio.to_dict(), (16, 16))
  assert isinstance(layout, TokenLayout)
  params = nn.meta.unbox(model.init(jax.random.key(0), spectrogram, layout)["params"])
  tx = optax.adamw(1e-3)
  state = create_train_state(params, tx, False)
  step = jax.jit(make_train_step(model, tx, lambda count: 1e-3, config, jax.random.key(1)))
  losses = []
  for position in range(60):
    state, metrics = step(state, batches(position % len(plans.epoch(0).batches)))
    losses.append(float(metrics["loss"]))
  assert float(metrics["packing_efficiency"]) > 0.8
  assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses  # chance is ln 8 = 2.08

  # Evaluation: per-clip softmax scores for real clips; the loss sum covers exactly those clips.
  evaluated = jax.jit(make_eval_step(model, config))(state.params, first)
  real = first["clip_mask"] > 0
  scores = np.asarray(evaluated["scores"])
  assert scores.shape == (4, 8, 8) and np.allclose(scores[real].sum(-1), 1.0, atol=1e-5)
  labels = first["label"][real].argmax(-1)
  expected = -np.log(scores[real][np.arange(len(labels)), labels]).sum()
  np.testing.assert_allclose(float(evaluated["loss_sum"]), expected, rtol=1e-4)


def _stream(sources, shard_index=0, shard_count=1):
  from ast_jax.data.packed_batches import packed_train_iterator

  plans = PackedPlans(clip_lengths(sources.train, SPEC.sample_rate), EpochSampler(len(sources.train), 0), SPEC, 0)
  return packed_train_iterator(plans, WaveformReader(sources.train, SPEC.sample_rate),
                               [e.labels for e in sources.train], 8, seed=0, shard_index=shard_index,
                               shard_count=shard_count)


def test_grain_iterator_restores_and_hosts_split_rows():
  sources = demo_sources(0, 40, 8)
  stream = _stream(sources)
  [next(stream) for _ in range(3)]
  state = stream.get_state()
  expected = next(stream)
  again = _stream(sources)
  again.set_state(state)
  restored = next(again)
  for key in expected:
    np.testing.assert_array_equal(restored[key], expected[key], err_msg=key)
  hosts = [_stream(sources, h, 2) for h in range(2)]
  whole = _stream(sources)
  for _ in range(2):
    full, parts = next(whole), [next(host) for host in hosts]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), full[key], err_msg=key)


class CountingReader(WaveformReader):
  """Records every clip it decodes (list.append is atomic, so Grain's read threads may share one)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.decoded: list[int] = []

  def decode(self, index: int) -> np.ndarray:
    self.decoded.append(int(index))
    return super().decode(index)


def host_clips(rows: list[list[int]], host: int, hosts: int) -> list[int]:
  """The clips of rows [host R / hosts, (host + 1) R / hosts) of a planned batch of R rows."""
  per_host = len(rows) // hosts
  return sorted(clip for row in rows[host * per_host:(host + 1) * per_host] for clip in row)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_decode_only_their_rows_and_together_make_the_global_batch(hosts):
  import dataclasses

  spec = dataclasses.replace(SPEC, rows=4, resolutions=(1.0, 2.0), crop="random", min_crop_frames=20)
  sources = demo_sources(0, 40, 8)
  lengths, labels = clip_lengths(sources.train, spec.sample_rate), [e.labels for e in sources.train]

  def plans():  # each host plans on its own
    return PackedPlans(lengths, EpochSampler(len(sources.train), 0), spec, 0)

  whole = PackedBatches(plans(), WaveformReader(sources.train, 16000), labels, 8, 0)
  readers = [CountingReader(sources.train, 16000) for _ in range(hosts)]
  parts = [PackedBatches(plans(), readers[h], labels, 8, 0, shard_index=h, shard_count=hosts) for h in range(hosts)]
  for position in (0, 3, len(whole.plans.epoch(0).batches)):  # the last: epoch 1's first batch
    full, own = whole(position), [part(position) for part in parts]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([batch[key] for batch in own]), full[key], err_msg=key)
    epoch, index = whole.plans.locate(position)
    rows = whole.plans.epoch(epoch).batches[index]
    for host, reader in enumerate(readers):
      assert sorted(reader.decoded) == host_clips(rows, host, hosts)  # its share, each clip once
      reader.decoded.clear()
    assert sum(len(host_clips(rows, h, hosts)) for h in range(hosts)) == int(full["clip_mask"].sum())


@pytest.mark.parametrize("hosts", [2, 4])
def test_evaluation_hosts_decode_only_their_rows(hosts):
  from ast_jax.data.packed_batches import packed_eval_batches

  spec = PackingSpec(rows=4, row_tokens=96, max_clips=8, mel_bins=64, max_frames=100, resolutions=(2.0,))
  sources = demo_sources(0, 8, 30)
  lengths, labels = clip_lengths(sources.eval, 16000), [e.labels for e in sources.eval]
  whole = list(packed_eval_batches(PackedPlans(lengths, None, spec), WaveformReader(sources.eval, 16000), labels, 8))
  readers = [CountingReader(sources.eval, 16000) for _ in range(hosts)]
  parts = [list(packed_eval_batches(PackedPlans(lengths, None, spec), readers[h], labels, 8, shard_index=h,
                                    shard_count=hosts)) for h in range(hosts)]
  assert all(len(part) == len(whole) for part in parts)
  for number, full in enumerate(whole):
    for key in full:
      np.testing.assert_array_equal(np.concatenate([part[number][key] for part in parts]), full[key], err_msg=key)
  batches = PackedPlans(lengths, None, spec).epoch(0).batches
  for host, reader in enumerate(readers):
    assert sorted(reader.decoded) == sorted(clip for rows in batches for clip in host_clips(rows, host, hosts))
  assert sum(len(reader.decoded) for reader in readers) == 30


def test_evaluation_is_planned_once_per_length_and_resolution(monkeypatch):
  from ast_jax.data import inputs
  from ast_jax.data import packed_batches as packed
  from configs import demo

  config = demo.get_config("elastic")
  config.packing.update(rows=2, eval_rows=2)
  packed_input = inputs.PackedInput(config, demo_sources(0, 24, 16))
  planned, plan_batches = [], packed.plan_batches

  def counted_plan(*args, **kwargs):
    planned.append(1)
    return plan_batches(*args, **kwargs)

  monkeypatch.setattr(packed, "plan_batches", counted_plan)
  first = [batch["index"] for batch in packed_input.eval_batches()]
  second = [batch["index"] for batch in packed_input.eval_batches()]
  assert len(planned) == 1
  np.testing.assert_array_equal(np.stack(first), np.stack(second))
  for length, resolution in ((64, None), (64, 2.0), (64, None), (None, 2.0), (None, None)):
    packed_input.eval_batches(length=length, resolution=resolution)
  assert len(planned) == 4  # the default, 64 frames at q = 1 and at q = 2, the default length at q = 2


def test_variable_resolution_and_random_crops_are_planned_per_clip_and_epoch():
  import dataclasses

  spec = dataclasses.replace(SPEC, drop_rate=0.0, resolutions=(1.0, 2.0, 3.0), crop="random", min_crop_frames=20)
  sources = demo_sources(0, 40, 8)
  lengths = clip_lengths(sources.train, spec.sample_rate)
  plans = PackedPlans(lengths, EpochSampler(len(sources.train), 0), spec, 0)
  reader = WaveformReader(sources.train, spec.sample_rate)
  batches = PackedBatches(plans, reader, [e.labels for e in sources.train], 8, 0)
  first, second = plans.epoch(0), plans.epoch(1)
  assert set(first.resolution.tolist()) == {1.0, 2.0, 3.0}
  assert not np.array_equal(first.resolution, second.resolution)  # drawn afresh each epoch
  shortest = spec.frame_samples(20)
  assert np.all(first.num_samples >= np.minimum(shortest, lengths))
  assert np.all(first.num_samples <= np.minimum(lengths, spec.max_samples))
  assert np.all(first.start + first.num_samples <= lengths) and first.start.max() > 0
  share = first.num_samples / np.minimum(lengths, spec.max_samples)
  assert share.min() < 0.5 and share.max() > 0.9  # random lengths, from short crops to (nearly) whole clips
  batch = batches(0)
  for row, slot in np.argwhere(batch["clip_mask"] > 0):
    clip, q = batch["index"][row, slot], first.resolution[batch["index"][row, slot]]
    assert batch["resolution"][row, slot] == q
    assert batch["window_shift"][row, slot] == int(16000 * 10.0 * q * 0.001)
    start, count = first.start[clip], first.num_samples[clip]
    np.testing.assert_array_equal(batch["waveform"][row, slot, :count], reader.decode(clip)[start:start + count])
    # the tokens of the slot are its (freq, time) grid at resolution q
    freq, time = spec.grid(int(count), float(q))
    assert batch["time_patches"][row, slot] == time
    assert int((batch["segment_ids"][row] == slot + 1).sum()) == freq * time


def test_evaluation_plan_packs_every_clip_once_at_one_resolution():
  from ast_jax.data.packed_batches import PackingSpec, packed_eval_batches

  sources = demo_sources(0, 8, 30)
  spec = PackingSpec(rows=2, row_tokens=96, max_clips=8, mel_bins=64, max_frames=100, resolutions=(2.0,))
  lengths = clip_lengths(sources.eval, 16000)
  plans = PackedPlans(lengths, None, spec)
  batches = list(packed_eval_batches(plans, WaveformReader(sources.eval, 16000), [e.labels for e in sources.eval],
                                     8))
  seen = np.concatenate([b["index"][b["clip_mask"] > 0] for b in batches])
  assert sorted(seen.tolist()) == list(range(30))
  assert all(np.all(b["resolution"][b["clip_mask"] > 0] == 2.0) for b in batches)
  assert all(b["segment_ids"].shape == (2, 96) for b in batches)
  assert plans.epoch(0).num_samples.max() <= spec.max_samples
