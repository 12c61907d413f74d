# %% [markdown]
# # Feature persistence: exact against composed matches
#
# A matching between two layers is a permutation. Matchings between consecutive layers can be
# *composed*: P(A→C) ≈ P(B→C)·P(A→B) (Sec. 3.2). Hypothesis 3 says that composition approximates
# the exact A→C match, but less well as the distance grows. The paper's Fig. 8 starts from layers
# 10, 12 and 20 of Gemma-2-2B, compares exact and composed matches to every later layer, and finds
# that feature similarity declines gradually but "remains significant for approximately five
# layers". Appendix D follows single features along their composed path through the model.
#
# This chapter repeats both on the embedded default and scores the matches with data: the matching
# score and the activation correlation on held-out tokens, a random permutation as the chance
# level, and judge labels on a sample (an LLM if configured, else the offline proxy).

# %% tags=["parameters"]
import os

PROFILE = os.environ.get("FEATMATCH_PROFILE", "quick")  # zoo profile: tiny (tests), quick (CI/book), full
MODEL = "smollm2-135m"  # featmatch model name
SAE_SET = None  # None: the embedded zoo of PROFILE ("featmatch-smollm2-{PROFILE}")
LAYERS = None  # None: every layer of the SAE set
N_TOKENS = None  # evaluation tokens (held-out split); None: 2048 on the tiny profile, else 16384
SEED = 0
OUT_DIR = None  # folder for the figures (set by `featmatch run-notebook`)
START_LAYERS = None  # None: at 38%, 46% and 77% of the depth, like the paper's 10, 12, 20 of 26
MAX_DISTANCE = 10  # later layers compared per start (pair statistics are F×F each)
N_PATHS = 4  # features followed through all layers (App. D)
MIN_FIRES = 5  # a feature must fire this often to be sampled, judged or followed
N_JUDGE = None  # features judged per (start, target) and method; None: 4 on tiny, else 8
JUDGE_VARIANT = "examples"  # the judge compares activating contexts ("explanations" for Neuronpedia texts)
SCHEDULER = None  # Dask scheduler for the heavy passes: None (here), "local:N" or an address (pip install 'featmatch[distributed]')

# %% [markdown]
# **Other models.** With a network:
#
# | parameter | GPT-2 small | Gemma-2-2B (the paper) |
# |---|---|---|
# | `MODEL` | `"gpt2-small"` | `"gemma-2-2b"` |
# | `SAE_SET` | `"gpt2-small-res-jb"` | `"gemma-scope-2b-pt-res-canonical"` |
# | `LAYERS` | `None` (0–11) | `list(range(10, 26))` |
# | `START_LAYERS` | `[2, 5, 8]` | `[10, 12, 20]` (the paper's) |
# | `MAX_DISTANCE` | `4` | `5` |
# | `N_TOKENS` | `16384` | `8192` |
#
# Every (start, target) pair needs dense co-activation statistics of `2 × 8 × F²` bytes (4.3 GB at
# Gemma Scope's 16k features), so keep `MAX_DISTANCE` and the starts few on hub SAEs.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from featmatch.chapters import common, persistence, plots
from IPython.display import Markdown

from featmatch.chapters.claims import claims_table, summary_markdown, write_claims
from featmatch.chapters.display import show_claims
from featmatch.chapters.setup import chapter_defaults, load_setup, save_figure
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import available_judge

pd.set_option("display.max_colwidth", 110)
pd.set_option("display.width", 200)

# profile-dependent defaults are resolved here, after papermill has injected the parameters
defaults = chapter_defaults("persistence", PROFILE, N_TOKENS=N_TOKENS, N_JUDGE=N_JUDGE)
N_TOKENS, N_JUDGE = defaults["N_TOKENS"], defaults["N_JUDGE"]
setup = load_setup(MODEL, SAE_SET, LAYERS, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE, scheduler=SCHEDULER)
layers = setup.layers
n_layers = int(setup.model.cfg.n_layers)
if START_LAYERS is None:
    START_LAYERS = persistence.start_layers(layers, n_layers)
pers_pairs = persistence.persistence_pairs(START_LAYERS, layers, MAX_DISTANCE)
stats = setup.stats(pairs=pers_pairs, progress=False)
explanations = ContextExplanations(stats, setup.tokenizer)
print(f"{setup.sae_set}: {len(layers)} SAEs, start layers {START_LAYERS}, up to {MAX_DISTANCE} layers ahead "
      f"({len(pers_pairs)} layer pairs, {stats.n_tokens} tokens)")

# %% [markdown]
# Matchings: folded SAE Match (encoder + decoder) between every pair of consecutive layers; from
# these, the composed matches; and the exact matches computed directly between each start and
# target.

# %%
adjacent = common.pair_matchings(setup.saes, common.adjacent_pairs(layers), ["folded"])["folded"]
pers = persistence.persistence_matchings(setup.saes, pers_pairs, adjacent, random_seed=SEED)
table = persistence.persistence_table(stats, pers)
table.pivot_table(index=["start", "distance"], columns="method", values="matching_score").round(3).head(12)

# %% [markdown]
# ## Exact against composed matches (Fig. 8)

# %%
fig, axes = plt.subplots(2, len(START_LAYERS), figsize=(5 * len(START_LAYERS), 7), squeeze=False)
for k, s in enumerate(START_LAYERS):
    plots.plot_persistence(axes[0, k], table, s, "matching_score", title=f"from layer {s}: matching score")
    plots.plot_persistence(axes[1, k], table, s, "correlation", title=f"from layer {s}: activation correlation")
fig.tight_layout()
save_figure(fig, OUT_DIR, "02_exact_vs_composed")
plt.show()

# %% [markdown]
# **What to see.** For each start layer, the score of the exact match (solid) and of the composed
# match (dashed) to every later layer, with a random permutation (dotted) as the chance level. The
# paper's picture is a gradual decline, the composed curve falling below the exact one as the
# distance grows (Hypothesis 3), and scores well above chance for about five layers.
#
# How often do the composed and exact matchings agree on the partner of a feature?

# %%
agree = persistence.agreement_table(table)
fig, ax = plt.subplots(figsize=(7, 4))
plots.plot_agreement(ax, agree)
fig.tight_layout()
save_figure(fig, OUT_DIR, "02_agreement")
plt.show()

# %% [markdown]
# **What to see.** At distance 1 both are the same matching (agreement 1); the faster the curve
# falls, the sooner composition and the direct assignment part ways.

# %% [markdown]
# ## Judge labels, exact against composed
#
# The paper's Fig. 8 is scored by its LLM judge (mean label, 1 = DIFFERENT … 3 = SAME). We judge a
# sample of features of each start layer, paired with their exact and their composed partner at
# every distance. Without a configured LLM this is the **offline proxy (not an LLM)**: MiniLM
# similarity of the two features' context summaries.

# %%
judge = available_judge(variant=JUDGE_VARIANT)
print(f"judge: {judge!r}")
judged = common.judge_matched_pairs(judge, explanations, stats, {k: pers[k] for k in ("exact", "composed")},
                                    N_JUDGE, min_fires=MIN_FIRES, seed=SEED)
labels = persistence.label_table(judged)
judge_name = common.judge_names(judged)
fig, axes = plt.subplots(1, len(START_LAYERS), figsize=(5 * len(START_LAYERS), 3.5), squeeze=False)
for k, s in enumerate(START_LAYERS):
    plots.plot_persistence(axes[0, k], labels, s, "mean_label", title=f"from layer {s}: mean label ({judge_name})")
    axes[0, k].set_ylim(0.9, 3.1)
fig.tight_layout()
save_figure(fig, OUT_DIR, "02_judge_persistence")
plt.show()

# %% [markdown]
# **What to see.** The mean label of exact and composed matches by target layer. Each point rests
# on a small sample (`N_JUDGE` features), so single points are noisy; the trend is what matters.

# %% [markdown]
# ## Feature paths (App. D)
#
# Following a feature through the chain of adjacent folded matches, from the first start layer to
# the last layer. We follow the features of the start layer that fire most often on the evaluation
# tokens, so that each step has contexts to show. `step_cost` is the folded MSE of the step into the
# layer; `text` summarises the feature's top activating contexts (top tokens, then snippets with the
# active token in «»).

# %%
start = START_LAYERS[0]
path_features = persistence.most_active_features(stats, start, N_PATHS, min_fires=MIN_FIRES)
paths = persistence.path_table(adjacent, start, path_features, stats=stats, source=explanations)
fig, ax = plt.subplots(figsize=(8, 4))
plots.plot_path_costs(ax, paths, start)
fig.tight_layout()
save_figure(fig, OUT_DIR, "02_path_costs")
plt.show()
persistence.path_grid(paths)

# %% [markdown]
# **What to see.** A rising step cost marks where the path jumps to a less similar feature. Where
# the summaries of consecutive layers name the same tokens and contexts, the feature persists;
# where they change, the path has moved to a different feature. A feature that never fired on the
# evaluation tokens has no summary.

# %% [markdown]
# ## Claims
#
# Every row gives what the paper says, our statistic, an effect size oriented so that positive
# supports the claim, its bootstrap 95% interval over the stated unit, the chance level (a random
# permutation or shuffled distances), the rule and the preconditions (`featmatch.chapters.claims`).
# *Hypothesis 3* is tested twice: exact matches should score above composed ones at distance ≥ 2,
# and that gap should grow with distance. Whether composition *approximates* the exact matching is
# tested on the partners themselves: the share of features that both send to the same feature at
# distance 2. *Persistence* is the number of layers over which the matching score stays, above the
# random-permutation chance level, at or above half of its one-layer value; "about five layers" is
# an equivalence claim (five, give or take two). A length at `MAX_DISTANCE` is censored, which makes
# the claim not testable rather than failed.

# %%
claims = [
    *persistence.claim_composition_degrades(table, "matching_score"),
    *persistence.claim_composition_degrades(table, "correlation"),
    persistence.claim_composed_agrees(pers),
    persistence.claim_persistence(table, "matching_score"),
    persistence.claim_persistence(table, "correlation"),
    persistence.claim_persistence(table, "matching_score", method="composed"),
]
write_claims(claims, OUT_DIR, "02")
table_claims = claims_table(claims)
show_claims(table_claims)

# %% [markdown]
# ## What this shows, and what it cannot show on this zoo
#
# Written from the claims table above.

# %%
Markdown(summary_markdown(table_claims))

# %% [markdown]
# The exact rows ask whether a feature still has a counterpart d layers later; the composed rows
# whether following the chain of adjacent matches still lands on it. The persistence rule measures
# how long a match keeps half of its one-step margin over chance, which is one reading of the
# paper's "remains significant". With only a few start layers the intervals over start layers are
# wide, and our SAEs are featmatch's small quick-profile SAEs, not Gemma Scope. The tiny profile
# of the tests uses 128-feature SAEs whose verdicts mean nothing.


# %% [markdown]
# ## All-layer feature flow
#
# The figure Feature Flow (Laptev et al., 2025) draws, built from SAE Match's paths (App. D): the
# `N_PATHS` features of the first layer that fire most often, followed through the adjacent folded
# matchings up to the last layer. In the interactive view, hover a node for its layer, feature,
# firing count and top activating contexts, and a band for the cost of that step; it works offline
# (plotly.js is part of the page). The static version below is the saved figure `02_feature_flow.png`.

# %%
from featmatch.chapters import flow

first = layers[0]
flow_features = persistence.most_active_features(stats, first, N_PATHS, min_fires=MIN_FIRES)
flow_paths = persistence.path_table(adjacent, first, flow_features, stats=stats, source=explanations)
flow.interactive(flow.flow_sankey(flow_paths))

# %%
fig, ax = plt.subplots(figsize=(12, 0.7 * max(len(flow_features), 2) + 1.6))
flow.plot_flow(ax, flow_paths)
fig.tight_layout()
save_figure(fig, OUT_DIR, "02_feature_flow")
plt.show()

# %% [markdown]
# **What to see.** Each row is one feature's path; the numbers are the feature it has reached at
# that layer, and a band narrows where the step into a layer is costly. An `×` marks where a path
# loses its partner. Whether a path still means the same thing is not in the figure: the contexts
# in the interactive view's hover text are the evidence: compare them from layer to layer.
