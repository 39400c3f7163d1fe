"""dpo.precompute_reference (engine/recipes/reference_cache.py): the reference's log-prob sums
computed once before training, cached on disk, read by the step.

Exactness: with the cache built on the same mesh (the same micro-batches, the same reference
forward), loss, grad norm, every step-0 gradient and the weights after the steps are BITWISE
those of computing the reference in the step — under dp, tp, pp (1F1B), cp ring and hybrid, in one
gloo world of 4. The cache is mesh-independent: a mesh reading a cache built at another mesh runs
no reference forward and agrees with its own in-step run to I-5's tolerances (the sums differ by
fp32 round-off only).

Cache: reused when nothing changed (no reference forward, counted; training builds one model, the
policy); rebuilt when the data file or the reference checkpoint (model.load) changes, or the file
is truncated or its values tampered with; training holds no reference model (every model built
before the first step, but the policy, is garbage by then). ``meshtron-plan --simulate`` builds no
reference with precompute either.
"""
from __future__ import annotations

import gc
import math
import shutil
import weakref

import torch

from tests.harness import run_world
from tests.test_dpo_exact import DATA, DPO
from tests.test_tp_exact import MODELS, STEPS, check, compare, make_cfg, merge_stages, run_steps

MESHES = [["parallel.tp=2", "parallel.cp=2"],                       # tp, cp ring
          ["parallel.pp=2", "parallel.dp=2"],                       # pp (1F1B), dp
          ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]]


def count_reference_forwards(patch=setattr) -> list[int]:
    """Count ``PipelineRuntime.forward_only`` calls (the reference's forwards; training's policy
    never calls it) from now on, patched in with ``patch`` (pytest's ``monkeypatch.setattr`` in
    the test process); returns the one-element counter."""
    from engine.parallel.pipeline.runtime import PipelineRuntime

    calls, original = [0], PipelineRuntime.forward_only

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    patch(PipelineRuntime, "forward_only", counted)
    return calls


def run_precomputed(cfg, mesh) -> dict:
    """``tests.test_tp_exact.run_steps`` with dpo.precompute_reference, as engine.train.train runs
    it: the cache first (read, or one reference pass), then the policy, no reference model."""
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.recipes.dpo import dpo_micro_batches
    from engine.recipes.reference_cache import precomputed_reference
    from engine.train import build_dataset, build_model, dpo_forward_backward

    data = build_dataset(cfg)
    logps = precomputed_reference(cfg, mesh, data, lambda: build_model(cfg, mesh).requires_grad_(False).eval())
    model = build_model(cfg, mesh)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = MeshOptimizer(model, cfg.optim, mesh, STEPS)
    out = {"loss": [], "norm": []}
    for step in range(STEPS):
        micro_batches = dpo_micro_batches(data, step, cfg, mesh)
        logps.attach(micro_batches, step)
        loss, _, _ = dpo_forward_backward(model, None, micro_batches, mesh, cfg)
        grads, norm = opt.reduce_and_clip()
        if step == 0:
            out["grads"] = canonical_tensors(model, dict(zip(names, [g.clone() for g in grads])))
        opt.update()
        out["loss"].append(loss)
        out["norm"].append(float(norm))
    out["weights"] = canonical_tensors(model, {n: p.detach() for n, p in model.named_parameters()})
    if mesh.pp > 1:
        for key in ("grads", "weights"):
            out[key] = merge_stages(out[key], mesh)
    return out


def bitwise_equal(a: dict, b: dict) -> bool:
    return ([float(x) for x in a["loss"]] == [float(x) for x in b["loss"]] and a["norm"] == b["norm"]
            and a["grads"].keys() == b["grads"].keys()
            and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
            and all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"]))


def precompute_world_checks(rank, world, cache_root):
    """Every mesh: in-step run vs precompute run (own cache: bitwise; the previous mesh's cache:
    no reference forward, I-5 tolerances). Returns per mesh (bitwise?, forwards, worst diffs)."""
    from engine.mesh import ParallelMesh

    forwards = count_reference_forwards()
    report = {}
    for i, mesh_over in enumerate(MESHES):
        over = MODELS["llama-gqa"] + DPO + mesh_over + [f"train.steps={STEPS}"]  # the pass covers these
        cfg = make_cfg(over, world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement)
        in_step = run_steps(cfg, mesh)
        own = make_cfg(over + ["dpo.precompute_reference=true", f"dpo.reference_cache={cache_root}/m{i}"], world)
        forwards[0] = 0
        pre = run_precomputed(own, mesh)
        built = forwards[0]
        entry = {"bitwise": bitwise_equal(pre, in_step), "forwards_building": built}
        if i:  # the previous mesh's cache, built at another mesh
            other = make_cfg(over + ["dpo.precompute_reference=true", f"dpo.reference_cache={cache_root}/m{i - 1}"],
                             world)
            forwards[0] = 0
            reused = run_precomputed(other, mesh)
            entry["forwards_reusing"] = forwards[0]
            entry["worst"] = compare(reused, in_step)
        report[" ".join(mesh_over)] = entry
    return report


def test_precomputed_reference_is_exact_on_every_axis(tmp_path):
    reports = run_world(4, precompute_world_checks, str(tmp_path), timeout=1200)
    for rank, report in enumerate(reports):
        for key, entry in report.items():
            if rank == 0:
                print(key, entry)
            assert entry["bitwise"], (rank, key)
            assert entry["forwards_building"] > 0, (rank, key)
            if "worst" in entry:
                assert entry["forwards_reusing"] == 0, (rank, key)
                check(entry["worst"], key)


# -- the cache, in one process, through engine.train.train --------------------------------------
def save_reference_checkpoint(seed: int, out) -> None:
    """A Megatron torch_dist checkpoint of the engine's initial weights at ``seed``."""
    from convert.megatron_dist import save_dist
    from engine.checkpoint import model_dict
    from engine.mesh import ParallelMesh
    from engine.model.gpt import canonical_tensors
    from engine.train import build_model

    cfg = make_cfg(MODELS["llama-gqa"] + DPO + ["parallel.dp=1", f"train.seed={seed}"], 1)
    model = build_model(cfg, ParallelMesh.single())
    canon = canonical_tensors(model, {n: p.detach() for n, p in model.named_parameters()})
    save_dist(canon.__getitem__, list(canon), model_dict(cfg.model), str(out))


TRAIN_STEPS = 2


class Watch:
    """Counts built models and reference forwards; at every DPO step, checks that the only model
    alive is the policy and that the step gets no reference model."""

    def __init__(self, monkeypatch):
        import engine.train as train

        self.forwards = count_reference_forwards(monkeypatch.setattr)
        self.built: list[weakref.ref] = []
        build, step = train.build_model, train.dpo_forward_backward

        def build_model(*args, **kwargs):
            model = build(*args, **kwargs)
            self.built.append(weakref.ref(model))
            return model

        def dpo_forward_backward(model, reference, *args, **kwargs):
            gc.collect()
            self.alive_at_steps.append(sum(r() is not None for r in self.built))
            self.reference_given.append(reference is not None)
            return step(model, reference, *args, **kwargs)

        monkeypatch.setattr(train, "build_model", build_model)
        monkeypatch.setattr(train, "dpo_forward_backward", dpo_forward_backward)

    def run(self, overrides: list[str], out) -> dict:
        from engine.mesh import ParallelMesh
        from engine.train import train

        self.forwards[0], self.built, self.alive_at_steps, self.reference_given = 0, [], [], []
        cfg = make_cfg(MODELS["llama-gqa"] + DPO + ["parallel.dp=1", f"train.steps={TRAIN_STEPS}",
                                                    f"train.output_dir={out}", "checkpoint.save_final=false"]
                       + overrides, 1)
        rows = train(cfg, ParallelMesh.single())
        return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
                "forwards": self.forwards[0], "built": len(self.built), "alive": self.alive_at_steps,
                "reference_given": self.reference_given}


def test_cache_reused_rebuilt_and_training_holds_no_reference(tmp_path, monkeypatch):
    data = tmp_path / "dpo.jsonl"
    shutil.copy(DATA / "dpo.jsonl", data)
    save_reference_checkpoint(7, tmp_path / "ckpt_a")
    save_reference_checkpoint(8, tmp_path / "ckpt_b")
    shutil.copytree(tmp_path / "ckpt_a", tmp_path / "ref")
    cache = tmp_path / "cache"
    common = [f"data.path={data}", f"model.load={tmp_path / 'ref'}"]
    pre = common + ["dpo.precompute_reference=true", f"dpo.reference_cache={cache}"]
    watch = Watch(monkeypatch)
    per_run = TRAIN_STEPS * 4 // 2  # steps × global batch / micro-batch: a reference forward per micro-batch

    in_step = watch.run(common, tmp_path / "r0")
    assert in_step["forwards"] == per_run and in_step["reference_given"] == [True] * TRAIN_STEPS

    first = watch.run(pre, tmp_path / "r1")  # cache miss: one pass, then the reference is gone
    (path,) = cache.glob("*.pt")
    assert first["forwards"] == per_run and first["built"] == 2
    assert first["alive"] == [1] * TRAIN_STEPS and first["reference_given"] == [False] * TRAIN_STEPS
    # the same micro-batches through the same reference forward: bitwise the in-step run
    assert first["loss"] == in_step["loss"] and first["grad_norm"] == in_step["grad_norm"]
    assert abs(first["loss"][0] - math.log(2)) < 1e-6  # policy = reference = checkpoint a

    second = watch.run(pre, tmp_path / "r2")  # unchanged: read, no reference forward, one model built
    assert second["forwards"] == 0 and second["built"] == 1 and second["alive"] == [1] * TRAIN_STEPS
    assert second["loss"] == first["loss"] and second["grad_norm"] == first["grad_norm"]

    # damaged: truncated, then values tampered with (a well-formed file whose checksum fails)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert watch.run(pre, tmp_path / "r3")["forwards"] == per_run
    saved = torch.load(path, weights_only=True)
    original = saved["logps"].clone()
    saved["logps"][0, 0] += 1.0
    torch.save(saved, path)
    again = watch.run(pre, tmp_path / "r4")
    assert again["forwards"] == per_run and again["loss"] == first["loss"]
    assert torch.equal(torch.load(path, weights_only=True)["logps"], original)  # rewritten whole

    # the data file changes (same size, other order): rebuilt
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")
    assert watch.run(pre, tmp_path / "r5")["forwards"] == per_run
    assert watch.run(pre, tmp_path / "r6")["forwards"] == 0

    # the reference checkpoint changes in place: rebuilt, and the step-0 loss is ln 2 again (the
    # policy loads the new weights too; sums of the old ones would not give ln 2)
    shutil.rmtree(tmp_path / "ref")
    shutil.copytree(tmp_path / "ckpt_b", tmp_path / "ref")
    changed = watch.run(pre, tmp_path / "r7")
    assert changed["forwards"] == per_run and abs(changed["loss"][0] - math.log(2)) < 1e-6


def test_simulation_builds_no_reference():
    """meshtron-plan --simulate: with precompute the step reads (synthetic) cached sums, so the
    rank holds the policy's parameters only — half those of computing the reference in the step."""
    from tests.test_simulate import simulate

    dpo = ["configs/tiny.yaml", "parallel.dp=1", "recipe=dpo", "data.source=files", f"data.path={DATA / 'dpo.jsonl'}",
           f"data.tokenizer={DATA / 'tokenizer'}"]
    params = {}
    for pre in ("false", "true"):
        out, report = simulate(*dpo, f"dpo.precompute_reference={pre}")
        assert out.returncode == 0 and report["ranks"][0]["loss_finite"], out.stdout[-2000:] + out.stderr[-2000:]
        params[pre] = report["ranks"][0]["categories"]["parameters"]
    assert params["true"] * 2 == params["false"], params
