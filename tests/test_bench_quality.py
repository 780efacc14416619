"""tools/bench_quality.py: the statistics and the grid it reports (the training runs themselves are the
real CLI, exercised by the train tests and by `python tools/bench_quality.py --quick`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "tools" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap_finds_a_real_shift_and_not_a_null_one(bench):
    rng = np.random.default_rng(0)
    base = rng.uniform(size=400)
    better = np.clip(base + rng.normal(0.05, 0.05, size=400), 0, 1)
    d, lo, hi = bench.paired_bootstrap(better, base, reps=2000)
    assert lo > 0 and lo < d < hi
    same = base[rng.permutation(400)]  # the same values, unpaired: no systematic difference
    d0, lo0, hi0 = bench.paired_bootstrap(base, base, reps=500)
    assert d0 == lo0 == hi0 == 0.0
    d1, lo1, hi1 = bench.paired_bootstrap(same, base, reps=2000)
    assert lo1 < 0 < hi1
    # pairing matters: the shift is small next to the spread between queries, and the paired interval
    # still excludes zero while the two systems' own intervals overlap
    lo_a, hi_a = bench.bootstrap_mean(better, reps=2000)
    lo_b, hi_b = bench.bootstrap_mean(base, reps=2000)
    assert lo_a < hi_b


def _reference_interval(strata: list[np.ndarray], reps: int, seed: int) -> tuple[float, float]:
    """An independent stratified percentile bootstrap: each stratum's queries drawn with replacement, the mean
    of the strata's means, its 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(seed)
    means = np.mean([v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1) for v in strata], axis=0)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_the_stratified_interval_is_the_percentile_bootstrap_within_sampling_noise(bench):
    rng = np.random.default_rng(1)
    strata = [rng.uniform(size=300), rng.beta(0.5, 2, size=120), rng.normal(0.3, 0.2, size=50)]
    centre, lo, hi = bench.stratified_bootstrap(strata, reps=20000, seed=3)
    assert centre == pytest.approx(np.mean([v.mean() for v in strata]))
    ref_lo, ref_hi = _reference_interval(strata, reps=20000, seed=11)
    # the ends of two 20,000-resample percentile intervals differ by Monte Carlo noise only (~1% of the width)
    width = ref_hi - ref_lo
    assert abs(lo - ref_lo) < 0.05 * width and abs(hi - ref_hi) < 0.05 * width
    assert (lo, hi) == bench.stratified_bootstrap(strata, reps=20000, seed=3)[1:]  # seeded: repeatable


def test_strata_that_cannot_vary_enter_as_constants(bench):
    rng = np.random.default_rng(2)
    varying = rng.uniform(size=200)
    alone, lo, hi = bench.stratified_bootstrap([varying], reps=4000, seed=5)
    # a task whose queries all score 0.8, and a task of one query: every resample has their means
    centre, lo3, hi3 = bench.stratified_bootstrap([varying, np.full(30, 0.8), np.array([0.2])], reps=4000, seed=5)
    assert centre == pytest.approx((alone + 0.8 + 0.2) / 3)
    assert (lo3, hi3) == pytest.approx(((lo + 1.0) / 3, (hi + 1.0) / 3))
    assert bench.stratified_bootstrap([np.full(5, 0.5), np.array([0.1])], reps=100) == pytest.approx((0.3, 0.3, 0.3))


def test_per_query_matrix_refuses_unpaired_files(bench, tmp_path):
    for name, queries in (("a", ["q1", "q2"]), ("b", ["q2", "q1"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.jsonl").write_text(
            "".join(json.dumps({"query": q, "rank": 1, "ndcg@10": 1.0}) + "\n" for q in queries))
    assert bench.per_query_matrix([tmp_path / "a", tmp_path / "a"], "test", "ndcg@10").shape == (2, 2)
    with pytest.raises(RuntimeError, match="cannot be paired"):
        bench.per_query_matrix([tmp_path / "a", tmp_path / "b"], "test", "ndcg@10")
    # the same queries with and without one instruction prompt pair; a text that merely ends alike does not
    assert bench._paired(["Find: q1", "Find: q2"], ["q1", "q2"])
    assert not bench._paired(["aq1", "bq2"], ["q1", "q2"]) and not bench._paired(["Find: q1", "q2"], ["q1", "q2"])
    assert not bench._paired(["q1"], ["q1", "q2"])


def test_grid_arguments(bench, capsys):
    args = bench._parse_args(["--grid", "random,b3,b3pp:32:0,1,2", "--grid", "random,b3:16,64:0"])
    assert args.blocks == [(["random", "b3", "b3pp"], [32], [0, 1, 2]), (["random", "b3"], [16, 64], [0])]
    assert bench._parse_args(["--quick"]).blocks == [(["random", "b3"], [16], [0, 1])]
    assert "random-redrawn" not in bench._parse_args([]).blocks[0][0]  # it differs from random only over epochs
    assert bench._parse_args(["--epochs", "2", "--grid", "random,random-redrawn:32:0"]).blocks[0][0][1] == \
        "random-redrawn"
    assert bench._parse_args(["--dataset", "mixture", "--grid", "task,b3:32:0"]).baseline == "task"
    for bad, why in ((["--grid", "b3,b3pp:32:0"], "every block must include random"),
                     (["--dataset", "mixture", "--grid", "random,b3:32:0"], "every block must include task"),
                     (["--grid", "random,b3-taskp:32:0"], "needs --task-p"),
                     (["--grid", "random,b3-taskp:32:0", "--task-p", "wordnet-category=x"], "integer p"),
                     (["--baseline", "task-redrawn", "--grid", "task-redrawn,b3-epoch:32:0"], "task-redrawn re-mines"),
                     (["--grid", "random,b4:32:0"], "unknown arm 'b4'"),
                     (["--grid", "random:32"], "expected ARMS:BATCHES:SEEDS"),
                     (["--grid", "random,b3@big:32:0"], "unknown arm 'b3@big'"),
                     (["--grid", "random,random-redrawn:32:0"], "random-redrawn re-mines at every epoch start"),
                     (["--grid", "random,b3:32:0", "--compare", "b3:b3pp"], "two arms of the grid")):
        with pytest.raises(SystemExit):
            bench._parse_args(bad)
        assert why in capsys.readouterr().err


def test_cache_keys_share_random_runs_across_mining_knobs(bench):
    r = bench.Recipe()
    other = bench.Recipe(p=10, K=16, h=4, teacher="/models/all-mpnet-base-v2")
    assert r.key("random") == other.key("random") and r.key("random+compute") == r.key("random")
    assert r.key("b3") != other.key("b3") and r.key("b3") == bench.Recipe(h=4).key("b3")  # h is b3pp's only
    assert r.key("b3pp") != bench.Recipe(h=4).key("b3pp")
    assert r.key("b3-refreshed") != r.key("b3")
    lagged = bench.Recipe(refresh_lag=0)  # a synchronous refreshed arm is another cell; the others are not
    assert lagged.key("b3-refreshed") != r.key("b3-refreshed") and lagged.key("b3") == r.key("b3")
    apart = bench.Recipe(per_task=True)  # --mine-per-task: mined arms get their own cells, random does not
    assert apart.key("random") == r.key("random") and apart.key("task") == r.key("task")
    assert apart.key("b3") != r.key("b3") and apart.key("gcbs") != r.key("gcbs")
    assert bench._recipe(bench._parse_args(["--mine-per-task"])).per_task is True
    assert bench._recipe(bench._parse_args([])).per_task is False
    # the B3 graph only changes b3 / b3pp cells; the symmetric loss changes every cell
    union = bench._recipe(bench._parse_args(["--edges", "union", "--rank-weights"]))
    assert (union.edges, union.rank_weights) == ("union", True)
    assert union.key("b3") != r.key("b3") and union.key("b3pp") != r.key("b3pp")
    assert union.key("random") == r.key("random") and union.key("gcbs") == r.key("gcbs")
    sym = bench._recipe(bench._parse_args(["--symmetric"]))
    assert sym.symmetric and all(sym.key(a) != r.key(a) for a in ("random", "task", "b3", "b3-refreshed"))
    # the mixture's tasks are mined apart; per-task p and the unprompted data are cells of their own
    mix = bench._recipe(bench._parse_args(["--dataset", "mixture", "--task-p", "fortunes=20,wordnet-category=10"]))
    assert mix.per_task and mix.task_params == {"fortunes": {"p": 20}, "wordnet-category": {"p": 10}}
    assert len({mix.key(a) for a in ("b3", "b3-taskp", "b3-noinstr")}) == 3
    assert mix.key("b3-taskp") != bench.Recipe(per_task=True, task_p="fortunes=30").key("b3-taskp")


def test_parallel_runner_merges_finished_cells_once_and_leaves_weights_behind(bench, tmp_path):
    path = REPO / "tools" / "bench_quality_parallel.py"
    spec = importlib.util.spec_from_file_location("bench_quality_parallel", path)
    par = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(par)
    args = par.parse(["--work", "w", "--out", "o", "--block", "6000=random,b3:16,32:0,1",
                      "--pairs-file", "6000=p.jsonl", "--", "--full-finetune", "--K", "32"])
    assert args.blocks == [(6000, "random,b3", [16, 32], [0, 1])] and args.recipe == ["--full-finetune", "--K", "32"]
    assert "--pairs-file" in par.common(args, 6000, tmp_path) and "--pairs-file" not in par.common(args, 500, tmp_path)
    workers = []
    for i, cells in enumerate((["random-B16", "b3-B16"], ["random-B16", "b3-B32"])):
        w = tmp_path / f"w{i}"
        for cell in cells:
            (w / "eval" / cell).mkdir(parents=True)
            (w / "eval" / cell / "metrics.json").write_text(str(i))
            (w / "runs" / cell / "export").mkdir(parents=True)
            (w / "runs" / cell / "export" / "model.safetensors").write_text("weights")
            (w / "runs" / cell / "bench.json").write_text(str(i))
        (w / "runs" / f"unfinished{i}").mkdir()  # stopped at the deadline: no bench.json
        workers.append(w)
    into = tmp_path / "merged"
    par.merge(workers, into)
    assert sorted(p.name for p in (into / "eval").iterdir()) == ["b3-B16", "b3-B32", "random-B16"]
    assert (into / "eval" / "random-B16" / "metrics.json").read_text() == "0"  # the first worker's copy
    assert sorted(p.name for p in (into / "runs").iterdir()) == ["b3-B16", "b3-B32", "random-B16"]
    assert not list(into.rglob("*.safetensors"))


def test_differences_pair_both_sides_on_shared_seeds(bench, tmp_path):
    """An arm with a seed random lacks: its difference to random (and --compare's) uses only the seeds both
    have, on both sides; the arm's own mean still uses all of its seeds."""
    def cell(name, seed, value):
        folder = tmp_path / name
        folder.mkdir()
        for split in bench.SPLITS:
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"query": f"q{i}", "rank": 1, **{m: value for m in ("ndcg@10", "mrr@10", "recall@1")}})
                + "\n" for i in range(50)))
        metrics = {split: {m: value for m in ("ndcg@10", "mrr@10", "recall@1")} for split in bench.SPLITS}
        return {"arm": name.split("-")[0], "seed": seed, "eval_dir": str(folder), "metrics": metrics}

    cells = {("random", 32): [cell("random-0", 0, 0.5)],
             ("b3", 32): [cell("b3-0", 0, 0.6), cell("b3-1", 1, 0.9)]}
    args = bench._parse_args(["--grid", "random,b3:32:0,1", "--compare", "b3:random", "--bootstrap", "200"])
    row = next(r for r in bench.summarise(cells, args)
               if r["arm"] == "b3" and r["split"] == "test" and r["metric"] == "ndcg@10")
    assert row["mean"] == pytest.approx(0.75) and row["vs_baseline"]["seeds"] == [0]
    assert row["vs_baseline"]["diff"] == pytest.approx(0.1)  # seed 0 against seed 0, not (0.6 + 0.9) / 2 - 0.5
    assert bench.compare(cells, args)[0]["test"]["diff"] == pytest.approx(0.1)


def test_a_missing_bench_extra_is_reported_before_any_work(bench, tmp_path, monkeypatch):
    """The plot (matplotlib, the ``bench`` extra) comes after every cell has trained; without the extra the run
    used to die there, 19 minutes in. ``None`` in sys.modules makes ``import matplotlib`` fail as if it were
    not installed. The pairs file does not exist either: the first work step would fail on it."""
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--work", str(work), "--pairs-file", str(tmp_path / "no-such-pairs.jsonl")])
    message = str(e.value)
    assert "matplotlib" in message and "bench extra" in message and "tools/install.sh --bench" in message
    assert not work.exists()
    monkeypatch.undo()
    try:  # CI installs the test extra only; a developer's machine may have the bench extra too
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="bench extra"):
            bench.check_optional_imports()
    else:
        bench.check_optional_imports()  # installed here: no complaint


def test_encoded_counts_what_the_trainer_embeds(bench, tmp_path):
    """Per step: the members' queries and positives, and the union of their hard negatives outside the step
    (a negative two members share, or one that is itself a member, is embedded once or not at all)."""
    from b3stream.schedule import Schedule, publish_schedule

    batches = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]
    negatives = [np.array([[4, 5], [4, 6], [1, -1], [7, 5]]),  # batch 0: {4, 5, 6, 7} outside; 1 is a member
                 np.array([[0, 0], [-1, -1], [-1, -1], [-1, -1]])]  # batch 1: {0}
    path = publish_schedule(Schedule.from_batches(batches, {"strategy": "random_hn", "batch_size": 4, "h": 2},
                                                  negatives), tmp_path, 0)
    enc = bench.encoded_per_epoch(path)
    assert (enc["queries"], enc["positives"], enc["negatives"], enc["steps"]) == (8, 8, 5, 2)
    assert enc["documents_per_step"] == pytest.approx((8 + 5) / 2)
    plain = publish_schedule(Schedule.from_batches(batches, {"strategy": "random", "batch_size": 4}), tmp_path, 1)
    assert bench.encoded_per_epoch(plain)["documents_per_step"] == 4


def test_batch_hardness_does_not_count_a_shared_label_as_a_negative(bench, tmp_path):
    """Two members of one class share the positive text (its label): the loss masks that pair, so the batch
    figures must too; the rest of the batch is scored as before, and each task gets its own figures."""
    from b3stream.schedule import Schedule, publish_schedule

    emb = tmp_path / "mine" / "minilm" / "embed-only" / "embeddings"
    emb.mkdir(parents=True)
    q = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    pos = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], np.float32)
    np.save(emb / "queries.npy", q)
    np.save(emb / "positives.npy", pos)
    np.save(emb / "positive_keys.npy", np.array([7, 7, 8, 9]))  # ids 0 and 1: one label
    np.save(emb / "tasks.npy", np.array([0, 0, 1, 1]))
    (emb / "embeddings.json").write_text(json.dumps({"task_names": ["labels", "retrieval"]}))
    path = publish_schedule(Schedule.from_batches([np.arange(4)], {"strategy": "random", "batch_size": 4}),
                            tmp_path / "schedules", 0)
    stats = bench.batch_stats(tmp_path, path)
    # id 0: its negatives are 2 and 3 (scores 0 and 0.6), never id 1's identical label (score 1)
    labels = stats["per_task"]["labels"]
    assert labels["neg_sim_mean"] == pytest.approx((0 + 0.6) / 2)
    assert labels["same_text_share"] == pytest.approx(1 / 3) and labels["neg_above_positive_share"] == 0
    # id 3 (own positive scores 0.8): id 2's positive (1.0) scores above it, ids 0 and 1 (0) do not
    assert stats["per_task"]["retrieval"]["neg_above_positive_share"] == pytest.approx((0 + 1 / 3) / 2)
    assert stats["same_text_share"] == pytest.approx(1 / 6)


def _cell(tmp_path, name: str, seed: int, per_task: dict[str, list[float]], prompt: str = "") -> dict:
    """A finished mixture cell: per-query nDCG@10 (and MRR, R@1 alike) of each task on both splits."""
    folder = tmp_path / f"{name}-{seed}"
    folder.mkdir()
    metrics = {}
    for split in ("validation", "test"):
        for task, values in per_task.items():
            (folder / f"{split}.{task}.jsonl").write_text("".join(
                json.dumps({"query": f"{prompt}{task} query {i}", "rank": 1,
                            **{m: v for m in ("ndcg@10", "mrr@10", "recall@1")}}) + "\n"
                for i, v in enumerate(values)))
        tasks = {t: {m: float(np.mean(v)) for m in ("ndcg@10", "mrr@10", "recall@1")} for t, v in per_task.items()}
        metrics[split] = {**{m: float(np.mean([x[m] for x in tasks.values()])) for m in ("ndcg@10", "mrr@10",
                                                                                          "recall@1")},
                          "per_task": tasks}
    return {"arm": name, "seed": seed, "eval_dir": str(folder), "metrics": metrics}


def test_the_mixture_is_averaged_over_tasks_and_bootstrapped_within_them(bench, tmp_path):
    """MMEB's average is the mean over datasets, not over queries: a task of 10 queries weighs as much as one of
    200. The interval resamples queries inside each task (one stratum: the plain bootstrap, unchanged)."""
    rng = np.random.default_rng(0)
    big, small = rng.uniform(size=200), rng.uniform(size=10)
    centre, lo, hi = bench.stratified_bootstrap([big, small], reps=2000)
    assert centre == pytest.approx((big.mean() + small.mean()) / 2)
    assert centre != pytest.approx(np.concatenate([big, small]).mean())
    assert lo < centre < hi
    assert bench.stratified_bootstrap([big], reps=500)[1:] == bench.bootstrap_mean(big, reps=500)
    # a shift in one task only moves the average by its share
    shifted = [big + 0.1, small]
    d, lo, hi = bench.stratified_bootstrap([a - b for a, b in zip(shifted, [big, small])], reps=500)
    assert d == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)


def test_summary_rows_per_task_and_on_the_average_against_the_baseline(bench, tmp_path):
    """On the mixture: the baseline is task batches; every arm gets an average row (what MMEB reports) and a
    row per task, each with its paired difference; b3-noinstr's queries carry no prompt and still pair."""
    base = {"wordnet-category": [0.5] * 40, "code": [0.8] * 10}
    better = {"wordnet-category": [0.7] * 40, "code": [0.8] * 10}
    cells = {("task", 32): [_cell(tmp_path, "task", 0, base, prompt="Classify: ")],
             ("b3", 32): [_cell(tmp_path, "b3", 0, better, prompt="Classify: ")],
             ("b3-noinstr", 32): [_cell(tmp_path, "b3-noinstr", 0, base)]}
    args = bench._parse_args(["--dataset", "mixture", "--grid", "task,b3,b3-noinstr:32:0", "--bootstrap", "200"])
    rows = bench.summarise(cells, args)
    b3 = {r["task"]: r for r in rows if r["arm"] == "b3" and r["split"] == "test" and r["metric"] == "ndcg@10"}
    assert set(b3) == {None, "wordnet-category", "code"}
    assert b3[None]["mean"] == pytest.approx(0.75)  # (0.7 + 0.8) / 2, not the query-weighted 0.72
    assert b3[None]["vs_baseline"]["diff"] == pytest.approx(0.1)
    assert b3["wordnet-category"]["vs_baseline"]["diff"] == pytest.approx(0.2)
    assert b3["code"]["vs_baseline"]["diff"] == pytest.approx(0.0)
    assert not any("vs_baseline" in r for r in rows if r["arm"] == "task")
    noinstr = next(r for r in rows if r["arm"] == "b3-noinstr" and r["task"] is None and r["split"] == "test"
                   and r["metric"] == "ndcg@10")
    assert noinstr["vs_baseline"]["diff"] == pytest.approx(0.0)
    table = bench.task_table(rows)
    assert "| b3 | 32 | 80.0 (+0.0) | 70.0 (+20.0*) |" in table
    assert "vs task" in bench.markdown_table(rows, cells[("task", 32)][0]["metrics"], "task")
