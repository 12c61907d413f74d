"""Circuit compression: task prompts, attribution graphs over SAE features, supernodes, scores
and export (issue 7; the second half of the Semantic OT paper, Cao, Do, Thai 2026).

Workflow::

    from featmatch import circuits as C
    task = C.digit_addition_prompts(tokenizer=model.tokenizer)
    acc = C.accuracy_by_format(C.answer_accuracy(model, task))   # per-format accuracy
    tt, _ = C.keep_correct(model, task)                            # ValueError if none correct
    g = C.attribution_graph(model, saes, tt, node_budget=100)     # nodes/edges DataFrames
    C.linearisation_check(model, saes, tt, scales=(1.0, 0.1))      # Σ attr vs true change
    D = C.decoder_cosine_distance(g, saes)                         # or any (n_feat, n_feat) matrix
    sn = C.supernodes(g, D, fraction=0.1, name="decoder cosine")
    summary, curves = C.compare_methods(model, saes, g, {"cos": sn, "layer": ...})
    C.export_graph_json("graph.json", g, sn)                       # circuit-tracer / Neuronpedia
    sel, ho = C.split_prompts(tt)                                  # F(n) on held-out prompts
    means = C.position_means(model, saes, sel)
    nodes, _ = C.linear_node_scores(model, saes, sel, means)
    order = nodes.sort_values("abs_score", ascending=False)
    curve = C.faithfulness_curve(model, saes, ho, {"linear": list(zip(order.layer, order.feature))},
                                 [16, 64, 256], means)
    C.group_graph_file("graph.json", "grouped.json")               # supernodes for any circuit-tracer JSON
    C.plot_compressed_graph(g, sn, ax=ax)

Definitions (node effects, edges, faithfulness, coherence, judge agreement) are stated in
the docstrings of :mod:`featmatch.circuits._attribution` and :mod:`featmatch.circuits._supernodes`; the JSON
format in :mod:`featmatch.circuits._export`.
"""

from __future__ import annotations

from ._attribution import (
    LOGIT_NODE,
    AttributionGraph,
    ablation_means,
    attribution_graph,
    linearisation_check,
    node_id,
)
from ._export import (
    REQUIRED_FIELDS,
    export_graph_json,
    graph_from_json,
    graph_to_json,
    load_graph_json,
    plot_compressed_graph,
    validate_graph_json,
)
from ._faithful import (
    FaithfulnessCurve,
    circuit_nodes,
    exact_node_effects,
    faithfulness_curve,
    linear_node_scores,
    position_means,
    ratio_ci,
    ratio_diff_ci,
    smallest_faithful,
    split_prompts,
)
from ._grouping import (
    NON_FEATURE_TYPES,
    cluster_labels,
    coactivation_distance,
    edge_profile_distance,
    group_graph_file,
    profile_distance,
    propose_supernodes,
)
from ._supernodes import (
    CompressionScores,
    Supernodes,
    WithinLayerAdditivity,
    all_nodes,
    compare_methods,
    compression_scores,
    decoder_cosine_distance,
    faithfulness,
    judge_agreement,
    layer_distance,
    node_ablation_effects,
    node_distance,
    sae_match_distance,
    supernodes,
    within_layer_additivity,
)
from ._tasks import (
    ADDITION_FORMATS,
    TaskPrompts,
    TaskTokens,
    accuracy_by_format,
    answer_accuracy,
    digit_addition_prompts,
    keep_correct,
    tokenize_task,
)

__all__ = [
    "ADDITION_FORMATS",
    "TaskPrompts",
    "TaskTokens",
    "digit_addition_prompts",
    "tokenize_task",
    "answer_accuracy",
    "accuracy_by_format",
    "keep_correct",
    "AttributionGraph",
    "attribution_graph",
    "ablation_means",
    "linearisation_check",
    "node_id",
    "LOGIT_NODE",
    "Supernodes",
    "supernodes",
    "node_distance",
    "decoder_cosine_distance",
    "sae_match_distance",
    "layer_distance",
    "all_nodes",
    "faithfulness",
    "node_ablation_effects",
    "compression_scores",
    "CompressionScores",
    "compare_methods",
    "judge_agreement",
    "WithinLayerAdditivity",
    "within_layer_additivity",
    "ratio_diff_ci",
    "REQUIRED_FIELDS",
    "graph_to_json",
    "export_graph_json",
    "validate_graph_json",
    "load_graph_json",
    "graph_from_json",
    "plot_compressed_graph",
    "split_prompts",
    "position_means",
    "linear_node_scores",
    "exact_node_effects",
    "ratio_ci",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "smallest_faithful",
    "circuit_nodes",
    "NON_FEATURE_TYPES",
    "profile_distance",
    "edge_profile_distance",
    "coactivation_distance",
    "cluster_labels",
    "propose_supernodes",
    "group_graph_file",
]
