# %% [markdown]
# # Circuit compression: a faithful circuit, then supernodes at equal budgets
#
# The second half of the Semantic OT paper (Cao, Do, Thai 2026) takes an attribution graph
# (a feature circuit) for a task, digit addition in the paper, and groups its nodes into a
# few interpretable **supernodes** by the semantic (Wasserstein) distance between features.
# Compressing a circuit only means something if the circuit carries the behaviour, so this
# chapter works in that order:
#
# 1. the task, and which prompt formats SmolLM2-135M-Instruct actually solves;
# 2. **faithfulness against node budget**, $F(n)$, measured on held-out prompts that were not
#    used to choose the nodes, with SAE error nodes kept as nodes (Marks et al. 2024); how far
#    the linear (attribution-patching) estimate is from real ablation; the smallest circuit
#    with $F \ge 0.8$;
# 3. that circuit as an attribution graph with edges;
# 4. supernodes from six groupings at **equal budgets** (the same number of supernodes, scored
#    at the same number of nodes): Semantic OT, decoder cosine (Feature Flow), folded SAE Match
#    cost, co-activation on the train split, layer adjacency, and edge-profile similarity;
# 5. the graph exported in circuit-tracer / Neuronpedia JSON, and automatic supernodes for any
#    such file (`featmatch supernodes GRAPH.json --out GROUPED.json`);
# 6. the claims table, and what it shows.
#
# With $m_p(C)$ the metric (logit of the right sum minus the logit of the next digit) on
# prompt $p$ when only the nodes in $C$ keep their values and every other SAE feature and
# error term of the chosen layers is replaced by its mean over the selection prompts at the
# same position,
# $F(C) = \sum_p [m_p(C) - m_p(\varnothing)] / \sum_p [m_p(\text{full}) - m_p(\varnothing)]$,
# with a bootstrap interval over held-out prompts.

# %% tags=["parameters"]
import os

PROFILE = os.environ.get("FEATMATCH_PROFILE", "quick")
MODEL = "smollm2-135m"
SAE_SET = None  # None: the featmatch zoo of PROFILE
LAYERS = None  # SAE layers of the circuit (None: profile default, featmatch/chapters/profiles.yaml)
FORMATS = ["sentence"]  # prompt format of the circuit (keys of circuits.ADDITION_FORMATS; one length)
N_PROMPTS = None  # correctly answered prompts, split half for node selection, half held out
BUDGETS = None  # node budgets n of the faithfulness curve F(n)
N_EXACT = None  # top linear candidates re-ranked by exact single-node ablation
N_CHANCE = None  # random node sets of the chosen size (chance level of F)
TARGET = 0.8  # faithfulness the circuit must reach on held-out prompts
FRACTION = 0.1  # setting: feature supernodes per feature node (the same for every grouping)
KEEP_FRACTION = 0.5  # setting: node budget of the equal-budget comparison, share of the circuit
SEED = 0
OUT_DIR = None  # folder for figures, the graph JSON files and 05_claims.csv (None: temp dir, no figures)
N_ACC = None  # prompts per format in the accuracy table (None: profile default, 55: all pairs)
N_TOKENS = None  # corpus tokens (eval split for Semantic OT samples, train split for co-activation)
N_SAMPLES = 32  # activation samples per feature (reservoir) for the Semantic OT distributions
SPACE = "layer:mid"  # reference space of Semantic OT (layer 15 of SmolLM2)
PCA_K = 32  # PCA dimensions of the reference space
OT_METHOD = "exact"  # "exact" (POT emd2), "sinkhorn" or "sliced"
N_THREADS = 1  # torch threads, 1 is several times faster than 2 on a shared 2-core machine
SCHEDULER = None  # Dask scheduler for the heavy passes: None (here), "local:N" or an address (pip install 'featmatch[distributed]')

# %%
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Markdown, display

from featmatch import circuits as C
from featmatch.chapters import compression as R
from featmatch.chapters import plots
from featmatch.chapters.claims import claims_table, write_claims
from featmatch.chapters.display import show_claims
from featmatch.chapters.setup import chapter_defaults, save_figure
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import available_judge
from featmatch.lm.corpus import token_batches
from featmatch.semantic import reference_coordinates

warnings.filterwarnings("ignore", category=UserWarning)
pd.set_option("display.precision", 3)
pd.set_option("display.float_format", "{:.4g}".format)  # no scientific notation for a whole column
pd.set_option("display.width", 160)
if N_THREADS:
    torch.set_num_threads(int(N_THREADS))
timer = R.Stopwatch()

P = chapter_defaults(
    "compression",
    PROFILE,
    LAYERS=LAYERS,
    N_PROMPTS=N_PROMPTS,
    BUDGETS=BUDGETS,
    N_EXACT=N_EXACT,
    N_CHANCE=N_CHANCE,
    N_ACC=N_ACC,
    N_TOKENS=N_TOKENS,
)
LAYERS, BUDGETS = list(P["LAYERS"]), [int(b) for b in P["BUDGETS"]]
N_PROMPTS, N_EXACT, N_CHANCE, N_ACC, N_TOKENS = (
    int(P[k]) for k in ("N_PROMPTS", "N_EXACT", "N_CHANCE", "N_ACC", "N_TOKENS")
)
setup = R.load_circuit_setup(
    MODEL, SAE_SET, layers=LAYERS, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE, scheduler=SCHEDULER
)
model, saes = setup.model, setup.saes
MODEL_LABEL = f"{MODEL} + {setup.sae_set}"
print(
    f"profile {PROFILE}: {MODEL_LABEL}, layers {LAYERS}, "
    f"{next(iter(saes.values())).cfg.d_sae} features per layer, {setup.tokens.numel()} held-out corpus tokens"
)
timer.lap("load model and SAEs")

# %% [markdown]
# ## 1. The task: digit addition, and which formats the model can do
#
# Every pair $a + b \le 9$ gives a single-digit answer. The accuracy below is greedy
# next-token accuracy on a seeded sample of `N_ACC` pairs per format.

# %%
task_all = C.digit_addition_prompts(tokenizer=model.tokenizer, n_per_format=N_ACC, seed=SEED)
with torch.no_grad():
    acc = C.accuracy_by_format(C.answer_accuracy(model, task_all))
acc

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
plots.plot_accuracy_by_format(ax, acc, chosen=FORMATS)
save_figure(fig, OUT_DIR, "05_accuracy_by_format")
plt.show()

# %% [markdown]
# *Figure: greedy accuracy per prompt format (orange: the format of the circuit). The bare
# `a plus b is ` form is rarely right; the sentence and few-shot forms are right most of the
# time. The circuit uses the sentence form: its prompts all have the same length, so nodes can
# be mean-ablated position by position, and they are 2.6 times shorter than the few-shot form.*

# %%
task = C.digit_addition_prompts(FORMATS, counterfactual="next")
tt_correct, per_prompt = C.keep_correct(model, task)
chosen_acc = C.accuracy_by_format(per_prompt)
tt = R.pick_prompts(tt_correct, N_PROMPTS, seed=SEED)
select, held_out = C.split_prompts(tt, 0.5, seed=SEED)
print(
    "accuracy on all 55 pairs of the chosen format:",
    ", ".join(f"{r.format} {r.n_correct}/{r.n}" for r in chosen_acc.itertuples()),
)
print(
    f"{len(tt)} correctly answered prompts: {len(select)} select the nodes, {len(held_out)} are held out; "
    f"e.g. {tt.prompts[0]!r} -> {model.tokenizer.decode(tt.answer_ids[0])!r}; metric: {tt.metric_name}"
)
timer.lap("prompts and accuracy")

# %% [markdown]
# ## 2. Faithfulness against node budget, on held-out prompts
#
# Every SAE feature and every layer's error term is a candidate node. Nodes are ranked on the
# selection prompts in two ways: **linear**, by the attribution-patching estimate of the effect
# of mean-ablating the node, $\hat\delta(u) = \sum_t (a_u^{(t)} - \bar a_u^{(t)})\,\partial m/\partial a_u^{(t)}$;
# and **exact top**, which replaces that estimate by the real single-node ablation effect for
# the `N_EXACT` top candidates (so the two rankings keep different node sets only for budgets
# below `N_EXACT`). For each budget $n$ the top $n$ nodes are kept and $F$ is measured on the
# held-out prompts. The dotted lines are the linear estimate of the same $F$,
# $\sum_{u\in C}\hat\delta(u) / \sum_u \hat\delta(u)$: the gap between dotted and solid lines is
# how far attribution patching is from real ablation at each budget.

# %%
means = C.position_means(model, saes, select)
top, rankings = R.node_rankings(model, saes, select, means, n_exact=N_EXACT)
timer.lap("node rankings (linear and exact)")
curve = C.faithfulness_curve(
    model,
    saes,
    held_out,
    rankings,
    BUDGETS,
    means,
    linear=C.linear_node_scores(model, saes, held_out, means),
    seed=SEED,
)
choice = R.faithful_circuit(curve, TARGET)
RANKING, N_NODES, best = choice
chance_draws = R.random_circuit_chance(
    model, saes, held_out, means, rankings["linear"], N_NODES, n_draws=N_CHANCE, seed=SEED
)
timer.lap("faithfulness curve on held-out prompts")
print(
    f"chosen circuit: top {N_NODES} nodes of the {RANKING!r} ranking, F = {best['faithfulness']:.3f} "
    f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}] on {len(held_out)} held-out prompts "
    f"({'reaches' if best['reached'] else 'does not reach'} {TARGET}); "
    f"random {N_NODES}-node sets: F = {chance_draws.mean():.3f}"
)
curve.table

# %%
fig, ax = plt.subplots(figsize=(8, 4))
plots.plot_faithfulness_budget(ax, curve.table, chosen=(RANKING, N_NODES), target=TARGET)
fig.tight_layout()
save_figure(fig, OUT_DIR, "05_faithfulness_budget")
plt.show()

# %% [markdown]
# *Figure: faithfulness $F(n)$ of the top-$n$ nodes on held-out prompts (bands: 95 % bootstrap
# intervals over prompts), for the two rankings, against the node budget (log scale). Dotted:
# the linear estimate of the same node sets. The ringed point is the chosen circuit, the dashed
# line the target $F = 0.8$.*
#
# The table below compares, for the top candidates, the linear estimate with the real effect of
# ablating each node alone (means over the selection prompts).

# %%
top

# %% [markdown]
# ## 3. The faithful circuit as an attribution graph
#
# The chosen nodes become an attribution graph over the selection prompts: node attributions
# (activation × gradient), and edges between nodes of consecutive layers (Sparse Feature
# Circuits), last layer to the metric.

# %%
graph = C.attribution_graph(model, saes, select, keep=C.circuit_nodes(curve, RANKING, N_NODES))
timer.lap("attribution graph of the circuit")
print(
    f"{graph.n_nodes} nodes ({len(graph.feature_nodes())} features, "
    f"{graph.n_nodes - len(graph.feature_nodes())} error nodes), {len(graph.edges)} edges"
)
R.graph_summary(graph)

# %% [markdown]
# ## 4. Supernodes from six groupings, at equal budgets
#
# Every grouping cuts the same average-linkage dendrogram procedure to the same number of
# feature supernodes (`FRACTION` of the feature nodes, a setting; error nodes stay singletons).
# **Semantic OT** compares the activation-weighted distributions of the features' firing
# positions (reference space `SPACE`); **decoder cosine** and **SAE Match** use the SAE weights;
# **co-activation** is 1 − the correlation of the two features' activations; **layer
# adjacency** groups by layer; **edge profile** compares each node's in- and out-edge weights
# in the graph. The two data-driven distances read the *train* split of the corpus; the judge
# below reads contexts from the held-out *eval* split, which no grouping has seen.

# %%
train_tokens = token_batches(model.tokenizer, n_tokens=N_TOKENS, seq_len=128, split="train", seed=SEED)
stats_fit = setup.stats(tokens=train_tokens, n_samples=N_SAMPLES, seed=SEED, progress=False)
ref = reference_coordinates(model, train_tokens, space=SPACE, pca_k=PCA_K)
D, no_samples = R.node_distances(
    graph, saes, stats_fit.samples, ref, method=OT_METHOD, seed=SEED, model=model, train_tokens=train_tokens
)
groups = R.group_by_distance(graph, D, fraction=FRACTION)
timer.lap("six distances and clustering")
print(f"{len(no_samples)} feature nodes never fired on the train-split tokens (put at the largest distance)")
R.supernode_overview(graph, groups)

# %%
R.distance_agreement({R.METHOD_LABELS[k]: d for k, d in D.items()})

# %% [markdown]
# *Spearman rank correlation between the six node distances over all pairs of feature nodes.*
#
# **Scores at equal budgets.** Each grouping adds whole supernodes in order of their summed
# selection-prompt effect; everything else is mean-ablated. Its faithfulness is read off its own
# supernode curve at exactly `KEEP_FRACTION` of the circuit's nodes: the two whole-supernode
# prefixes around that node count are measured and interpolated prompt by prompt, so every
# grouping is compared at the same number of nodes. The last row keeps the same number of single
# top nodes. Faithfulness and task accuracy kept are measured on the held-out prompts.

# %%
score = pd.Series(C.linear_node_scores(model, saes, select, means)[0].set_index("node_id")["score"])
eq = R.equal_budget_scores(
    model, saes, held_out, graph, groups, score, means, keep_fraction=KEEP_FRACTION, seed=SEED
)
timer.lap("equal-budget scores")
R.equal_budget_table(eq, {k: g.n_supernodes for k, g in groups.items()})

# %% [markdown]
# **Do the supernodes act as units?** Each supernode is split by layer, and every part with two
# or more features is ablated whole and feature by feature on the held-out prompts. The
# additivity error is the summed gap between the joint effect and the sum of the single effects,
# over the members' summed absolute effects: 0 when the members of one layer add up exactly,
# large when they interact (redundant members saturate). It replaces the cross-layer coherence
# of earlier versions, which penalised exactly the persisting features Semantic OT should group
# (`featmatch.circuits.within_layer_additivity`). Intervals: bootstrap over held-out prompts.

# %%
additivity = C.within_layer_additivity(model, saes, graph, groups, held_out, means)
timer.lap("within-layer additivity")
R.additivity_table(additivity, seed=SEED)

# %% [markdown]
# **Do they read as one concept?** The judge compares the activating contexts of feature pairs
# inside a supernode (at most 3 pairs per supernode, the same for every grouping), against random
# pairs of circuit features (the chance row). The contexts come from the held-out eval split.

# %%
stats = setup.stats(n_samples=N_SAMPLES, seed=SEED, progress=False)
explainer = ContextExplanations(stats, model.tokenizer)
judge = available_judge(variant="examples")
judged = R.judge_groupings(graph, groups, judge, R.describe_feature(explainer), seed=SEED)
timer.lap("judge agreement")
print(f"judge: {judge!r}")
R.judge_table(judged, seed=SEED)

# %% [markdown]
# ## 5. Export for Neuronpedia, and automatic supernodes for any circuit-tracer graph
#
# The circuit with its Semantic OT supernodes is written in circuit-tracer's JSON format (the
# files Neuronpedia's graph viewer loads), reloaded and validated: metadata `slug`, `scan`,
# `prompt_tokens`, `prompt`; per node `node_id`, `feature`, `layer`, `ctx_idx`, `feature_type`,
# `jsNodeId`, `clerp`; per link `source`, `target`, `weight`; every link end and supernode
# member an existing node. The same file is then grouped automatically by edge profile, as
# `featmatch supernodes GRAPH.json --out GROUPED.json` does for any circuit-tracer graph.

# %%
SHOWN = "semantic_ot"
out = Path(OUT_DIR) if OUT_DIR else Path(tempfile.mkdtemp(prefix="featmatch-05-"))
json_path, nodes_j, links_j, sn_j = R.export_circuit(
    out / "05_circuit_semantic_ot.json",
    graph,
    groups[SHOWN],
    model_name=MODEL,
    sae_set=setup.sae_set,
    tokenizer=model.tokenizer,
    prompt=select.tokens[0],
    explainer=explainer,
    n_layers=model.cfg.n_layers,
)
grouped_path, grouped = C.group_graph_file(
    json_path, out / "05_circuit_edge_profile_grouped.json", fraction=FRACTION
)
print(
    f"wrote {json_path.name}: {len(nodes_j)} nodes (incl. the metric node), {len(links_j)} links, "
    f"{len(sn_j)} supernodes; reloaded and validated"
)
print(
    f"wrote {grouped_path.name}: {len(grouped['qParams']['supernodes'])} supernodes of two or more members "
    "proposed from the JSON alone (edge profile)"
)

# %%
fig, ax = plt.subplots(figsize=(9, 5.5))
plots.plot_compressed_graph(ax, graph, groups[SHOWN], max_edges=30)
ax.set_xlabel("supernode (boxes packed into columns; colour: summed attribution, red > 0)")
save_figure(fig, OUT_DIR, "05_compressed_graph")
plt.show()

# %% [markdown]
# *Figure: the circuit compressed by Semantic OT. Each box is a supernode spanning the layers of
# its members, coloured by its summed attribution; `err` boxes are SAE error nodes. Arrows are
# summed edge weights between supernodes (red positive, width by size).*
#
# ## 6. Claims
#
# Each row has an effect oriented so that positive supports the claim, a 95 % bootstrap
# interval over its units, a chance level from a null (random node sets of the same size;
# permuted rankings; zero for paired differences) and a tolerance stated in the docstring of
# `featmatch.chapters.compression.compression_claims`. The verdict rule is the one of
# `featmatch.chapters.claims`.

# %%
claims = R.compression_claims(
    curve,
    choice,
    chance_draws,
    top,
    eq,
    shown=SHOWN,
    seed=SEED,
    sections={
        "faithful": "2. Faithfulness against node budget, on held-out prompts",
        "ranking": "2. Faithfulness against node budget, on held-out prompts",
        "groupings": "4. Supernodes from six groupings, at equal budgets",
    },
) + R.unit_claims(
    additivity,
    judged,
    shown=SHOWN,
    judge_name=judge.name,
    seed=SEED,
    section="4. Supernodes from six groupings, at equal budgets",
)
table = claims_table(claims)
write_claims(table, OUT_DIR, "05")
show_claims(table)

# %% [markdown]
# ## What this shows, and what it cannot show
#
# The verdicts below are rendered from the claims table above.

# %%
display(Markdown(R.claims_summary(table)))

# %% [markdown]
# What it cannot show:
#
# * **One task, one format, one model.** The circuit is for single-digit sums in one sentence
#   template on SmolLM2-135M-Instruct with the featmatch zoo SAEs of two layers. Digits in other
#   positions, other templates, and the paper's GPT-2 small and Gemma-2-2B circuits are not tested.
# * **Faithfulness depends on the ablation.** Nodes outside the circuit are replaced by their
#   per-position means over the selection prompts; zero ablation or corpus means give other values.
#   The circuit needs hundreds of nodes because every SAE feature of both layers outside it is
#   ablated, and error nodes count as nodes.
# * **Equal budgets, one budget.** Groupings are compared at one number of supernodes (`FRACTION`)
#   and one node budget (`KEEP_FRACTION`); the compression ratio is a setting, not a result. The
#   held-out set is small, so differences below the tolerance are not resolved.
# * **The judge.** Without an LLM endpoint the judge is the offline proxy (sentence-embedding
#   similarity of the contexts); its labels are not the paper's LLM labels, and a few pairs per
#   supernode do not rank groupings finely. The paper's "accuracy", which its sources never
#   define, is not compared with any number of ours.

# %%
timer.table()
