"""`alignkit annotate` statistics and aggregation: published worked examples and values worked out by hand (the
working is in each docstring), and the export's rows as the data layer reads them."""

import math

import pytest

pytest.importorskip("sqlalchemy")

from alignkit.annotate.export import copeland_scores, plackett_luce_fit, rows_of  # noqa: E402
from alignkit.annotate.ranking import (  # noqa: E402
    InvalidRanking,
    groups_from_ranks,
    midranks,
    ranks_from_groups,
    wins,
)
from alignkit.annotate.stats import (  # noqa: E402
    cohen_kappa,
    kendall_tau_b,
    krippendorff_alpha,
    pair_answers,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the general example: 4 observers, 12 units,
# values 1-5, missing values (None).
OBSERVERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


@pytest.mark.parametrize("metric, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849),
                                               ("ratio", 0.797)])
def test_krippendorff_alpha_matches_the_published_example(metric, published):
    units = [[v for v in unit if v is not None] for unit in zip(*OBSERVERS)]  # unit 12 has one value: unpairable
    assert krippendorff_alpha(units, metric) == pytest.approx(published, abs=5e-4)


def test_krippendorff_alpha_binary_example_and_edge_cases():
    """Krippendorff (2011), first example: two observers, ten units, binary: α = 0.095 (nominal). Hand check:
    o_00 = 10, o_01 = o_10 = 4, o_11 = 2; n₀ = 14, n₁ = 6, n = 20; α = 1 − 19·8 / (2·14·6) = 1 − 152/168."""
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert krippendorff_alpha(list(zip(a, b)), "nominal") == pytest.approx(1 - 152 / 168)
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == pytest.approx(1.0)  # perfect agreement
    assert krippendorff_alpha([[1, 1], [1, 1]], "ordinal") is None    # no variation: undefined
    assert krippendorff_alpha([[1], [2]], "interval") is None         # nothing pairable
    with pytest.raises(ValueError):
        krippendorff_alpha([[1, 2]], "cosine")


def test_ordinal_alpha_equals_interval_alpha_on_untied_rankings():
    """Untied rankings of one size use every rank equally often, so the ordinal distance is the interval one
    times a constant, and α (a ratio of distances) is the same."""
    rankings = [([1, 2, 3], [1, 3, 2]), ([2, 1, 3], [2, 1, 3]), ([3, 2, 1], [1, 2, 3])]
    units = [[a[r], b[r]] for a, b in rankings for r in range(3)]
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(krippendorff_alpha(units, "interval"))


def test_cohen_kappa_worked_example():
    """50 yes/no answers of two raters: 20 both yes, 5 yes/no, 10 no/yes, 15 both no. p_o = 35/50 = 0.7;
    p₁(yes) = 25/50, p₂(yes) = 30/50, so p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 − 0.5)/(1 − 0.5) = 0.4."""
    answers = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(answers) == pytest.approx(0.4)
    assert cohen_kappa([(1, 1), (0, 0)]) == pytest.approx(1.0)
    assert cohen_kappa([(1, 1), (1, 1)]) is None  # p_e = 1
    assert cohen_kappa([]) is None


def test_kendall_tau_b_by_hand():
    """x = (1, 2, 2, 3), y = (1, 3, 2, 2): of the 6 pairs, (0,1) (0,2) (0,3) are concordant, (1,3) discordant,
    (1,2) tied in x only, (2,3) tied in y only: τ-b = (3 − 1)/√((6 − 1)(6 − 1)) = 0.4.
    x = (1, 1, 2, 3), y = (1, 2, 2, 3): 4 concordant, one tie in each: 4/√(5·5) = 0.8."""
    assert kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau_b([1, 2, 3], [2, 2, 2]) is None


def test_rank_conversions():
    order = [2, 0, 3, 1]  # display position p shows response order[p]
    ranks = ranks_from_groups([[1], [0, 3], [2]], order)
    # response 0 (shown at position 1) best; responses 2 and 1 (positions 0 and 3) tied; response 3 last
    assert ranks == [1, 2, 2, 3]
    assert groups_from_ranks(ranks, order) == [[1], [0, 3], [2]]
    assert wins([1, 2, 2, 3]) == [3.0, 1.5, 1.5, 0.0]
    assert midranks([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    assert pair_answers([1, 2, 2]) == [1, 1, 0]
    for bad in ([], [[0, 1]], [[0], [0, 1, 2, 3]], [[0], [1], [2], [4]], [[0], [], [1, 2, 3]], [[True], [1, 2, 3]],
                "0123", [[0, 1, 2, "3"]]):
        with pytest.raises(InvalidRanking):
            ranks_from_groups(bad, order)


def test_plackett_luce_fit_is_bradley_terry_for_pairs():
    """Two responses, A above B in 2 of 3 judgements: the PL model is Bradley–Terry, σ(θ_A − θ_B) = 2/3 at the
    maximum, so θ_A − θ_B = log 2 (a negligible prior). With prior λ and n identical judgements A > B, the
    stationary point θ = (t, −t) satisfies n·(1 − σ(2t)) = λ·t."""
    theta = plackett_luce_fit([[1, 2], [1, 2], [2, 1]], prior=1e-9)
    assert theta[0] - theta[1] == pytest.approx(math.log(2), abs=1e-6)
    for n, prior in ((1, 0.1), (5, 0.1), (3, 1.0)):
        t = plackett_luce_fit([[1, 2]] * n, prior=prior)[0]
        assert n * (1 - 1 / (1 + math.exp(-2 * t))) == pytest.approx(prior * t, abs=1e-9)


def test_plackett_luce_fit_with_ties_and_rankings():
    tied = plackett_luce_fit([[1, 1, 2]])  # responses 0 and 1 tied first: equal worths, above response 2
    assert tied[0] == pytest.approx(tied[1], abs=1e-12) and tied[0] > tied[2]
    assert plackett_luce_fit([[1, 1]]) == pytest.approx([0.0, 0.0], abs=1e-12)
    order = plackett_luce_fit([[1, 2, 3], [1, 3, 2], [2, 1, 3]])
    assert order[0] > order[1] > order[2]  # response 0 best twice; 1 above 2 in two of three
    assert sum(order) == pytest.approx(0.0, abs=1e-12)


def test_copeland_majority():
    """Each pair goes to the majority: a Condorcet cycle gives everyone one win; a split vote halves."""
    assert copeland_scores([[1, 2, 3], [3, 1, 2], [2, 3, 1]]) == [1.0, 1.0, 1.0]
    assert copeland_scores([[1, 2, 3], [1, 3, 2]]) == [2.0, 0.5, 0.5]
    assert copeland_scores([[1, 2, 2]]) == wins([1, 2, 2])  # one judgement: its own wins


class _Item:
    id, prompt, responses = 7, "describe the red cat ->", ["kind clear", "rude vague", "kind rude", "clear wrong"]


def test_export_rows_are_read_by_the_data_layer_as_their_kind(tmp_path):
    import json

    from alignkit.data.formats import load_rows

    scores = wins([2, 1, 2, 3])  # response 1 best, 0 and 2 tied, 3 worst
    for kind, count in (("ranked", 1), ("pairwise", 5), ("unary", 2)):
        rows = rows_of(kind, _Item, scores, {"_item": 7})
        assert len(rows) == count
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        loaded = load_rows([str(path)], kind="auto")
        assert loaded.kind == kind
        if kind == "ranked":
            row = loaded.rows[0]
            assert row.responses == ["rude vague", "kind clear", "kind rude", "clear wrong"]
            assert row.tie_groups() == [0, 1, 1, 2]
        if kind == "pairwise":  # 6 pairs less the tied one
            assert {(r.chosen, r.rejected) for r in loaded.rows} == {
                ("rude vague", "kind clear"), ("rude vague", "kind rude"), ("rude vague", "clear wrong"),
                ("kind clear", "clear wrong"), ("kind rude", "clear wrong")}
        if kind == "unary":
            assert [(r.completion, r.label) for r in loaded.rows] == [("rude vague", True), ("clear wrong", False)]


def test_the_stats_report_by_hand(tmp_path):
    """Two annotators, two items of 3 responses shown in data order (so position = response); item 1 has label 0,
    item 2 scores (3, 2, 1). Ranks: a: item 1 (1, 2, 3), item 2 (1, 1, 2); b: item 1 (2, 1, 3), item 2 (1, 2, 3).
    - pair answers over (0,1) (0,2) (1,2): item 1 a (+, +, +), b (−, +, +); item 2 a (=, +, +), b (+, +, +):
      4 of 6 agree.
    - κ over both orientations: a answers + 5, − 5, = 2 (of 12); b + 6, − 6: p_e = 2 · 5/12 · 6/12 = 5/12,
      p_o = 8/12, κ = (8/12 − 5/12) / (7/12) = 3/7.
    - τ-b: item 1: one discordant, two concordant pairs: 1/3; item 2: a ties (0, 1), two concordant: 2/√(2·3).
    - interval α over mid-ranks: units (1, 2) (2, 1) (3, 3) (1.5, 1) (1.5, 2) (3, 3); observed Σ o δ² = 2 + 2 +
      0.5 + 0.5 = 5; the 12 values have mean 2 and Σ (v − 2)² = 7.5, so Σ n_c n_k δ² = 2 · 12 · 7.5 = 180;
      α = 1 − 11 · 5 / 180.
    - position bias: response 0 (shown first) best for a on item 1 (1), half of a's tie on item 2 (½), not for b on
      item 1 (0), for b on item 2 (1): 2.5/4; the second position: 1 (b, item 1) + ½ (a's tie) = 1.5/4; chance 1/3.
    - label 0 (item 1): a 1, b 0. Scores (item 2): a τ-b 2/√6, b 1."""
    from alignkit.annotate.candidates import Candidate
    from alignkit.annotate.db import open_store
    from alignkit.annotate.stats import annotation_stats, format_stats

    store = open_store(str(tmp_path / "feedback.sqlite"))
    store._random.shuffle = lambda order: None  # show every item in data order
    store.add_items([Candidate("p1", ["x", "y", "z"], 0, None, "c:1"), Candidate("p2", ["u", "v", "w"], None,
                                                                              [3.0, 2.0, 1.0], "c:2")])
    ranks = {"a": {1: [1, 2, 3], 2: [1, 1, 2]}, "b": {1: [2, 1, 3], 2: [1, 2, 3]}}
    for name, wanted in ranks.items():
        annotator = store.authenticate(store.add_annotator(name))
        for _ in wanted:
            shown = store.current(annotator.id, 2)
            store.submit(annotator.id, shown.item_id, groups_from_ranks(wanted[shown.item_id], shown.order))
    store.set_setting("overlap", 2)
    report = annotation_stats(store, metric="interval")
    agreement = report["agreement"]
    assert agreement["pairwise_agreement"] == pytest.approx(4 / 6)
    assert agreement["cohen_kappa"][0]["kappa"] == pytest.approx(3 / 7)
    assert agreement["kendall_tau_b"] == pytest.approx((1 / 3 + 2 / math.sqrt(6)) / 2)
    assert agreement["krippendorff_alpha"] == pytest.approx(1 - 11 * 5 / 180)
    bias = report["position_bias"]
    assert bias["first_shown_best"] == pytest.approx(2.5 / 4) and bias["chance"] == pytest.approx(1 / 3)
    assert bias["best_by_position"] == pytest.approx([2.5 / 4, 1.5 / 4, 0.0])
    assert report["label"]["per_annotator"] == {"a": 1.0, "b": 0.0} and report["label"]["agreement"] == 0.5
    assert report["scores"]["kendall_tau_b"] == pytest.approx((2 / math.sqrt(6) + 1) / 2)
    assert report["items_complete"] == 2 and [a["done"] for a in report["annotators"]] == [2, 2]
    text = format_stats(report)
    assert "pairwise agreement    0.667" in text and "Cohen's kappa         0.429" in text
    assert "Krippendorff's alpha  0.694  (interval metric" in text
    assert annotation_stats(store)["agreement"]["alpha_metric"] == "ordinal"
