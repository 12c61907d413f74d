# %% [markdown]
# # Semantic optimal transport: matching features by what they fire on
#
# Cao, Do and Thai (2026) represent an SAE feature not by its decoder vector but by the
# **activation-weighted distribution of the hidden states on which it fires**, pushed into
# one shared reference space, and compare two features by the Wasserstein distance between
# those distributions (`PAPERS.md`, section 2). They report that this matches features
# across layers better than decoder cosine (Feature Flow) and SAE Match, judged by an LLM.
#
# Semantic OT reads activations; both of the paper's baselines are data-free. The scores
# (matching score, activation correlation, the contexts a judge reads) also measure
# co-firing, so a data-driven method is expected to beat data-free ones. This chapter
# therefore adds the fair comparator, the **co-activation baseline**: the Pearson
# correlation of two features' activations on the train split (Balcells et al. 2024).
# Every method is run in both forms, a one-to-one **assignment** and a many-to-one
# **top-1**, and compared like for like.
#
# **Definitions featmatch had to choose** (the paper's full text is not available; see the
# docstrings of `featmatch.semantic`):
#
# * Reference space: the hidden states of the *same token positions* at one reference hook
#   (`REFERENCE`; default the middle layer), reduced by a PCA fitted once on it (`PCA_K`).
# * Distribution of feature $i$: $\mu_i = \sum_t w_{it}\,\delta_{z_t}$ over a uniform sample
#   of at most `N_SAMPLES` firing positions, $w_{it} \propto f_i(x_t)$.
# * Distance: exact $W_2$ with the Euclidean ground cost (`ot.emd2`), found by
#   `featmatch.semantic.nearest`: the `CANDIDATES` features with the smallest lower bound on
#   $W_2$ from their means and spreads, reranked by exact $W_2$. The section on nearest
#   neighbours measures how often this finds the exact nearest feature.
#
# **No circularity.** The distributions and the co-activation correlations come from the
# *train* split of the offline corpus; every score is computed on the held-out *eval* split.
# The two slices share no document.

# %% tags=["parameters"]
import os

PROFILE = os.environ.get("FEATMATCH_PROFILE", "quick")  # zoo profile: tiny (tests), quick (book), full
MODEL = "smollm2-135m"
SAE_SET = None  # default: the zoo set featmatch-smollm2-{PROFILE}
PAIRS = None  # default: adjacent mid→mid+1, mid→last, 0→last (paper_pairs)
REFERENCE = "layer:mid"  # "layer:L", "layer:mid", "final" or "embed"
PCA_K = None  # PCA dimensions of the reference space; None: profile default; 0: no PCA
N_SAMPLES = None  # samples per feature distribution; None: profile default
N_TOKENS = None  # tokens per slice (train slice and eval slice); None: profile default
METHOD = "exact"  # "exact" (nearest-neighbour search), "sinkhorn" (slow) or "sliced"
CANDIDATES = (
    None  # candidates per feature reranked by METHOD; None: featmatch.semantic.DEFAULT_CANDIDATES
)
N_NN = None  # query features for the nearest-neighbour recall; None: profile default
N_JUDGE = None  # judged features per pair, the same for every method; None: profile default
SEED = 0
OUT_DIR = None  # folder for the figures (PNG) and the claims table (CSV), None: not saved
# The profile defaults (tiny, quick, full) are in featmatch/chapters/profiles.yaml.
SCHEDULER = None  # Dask scheduler for the heavy passes: None (here), "local:N" or an address (pip install 'featmatch[distributed]')

# %% [markdown]
# Values for the paper's own settings (they need the hub, so they do not run offline):
#
# | setting | `MODEL` | `SAE_SET` | `PAIRS` | `REFERENCE` |
# |---|---|---|---|---|
# | GPT-2 small | `"gpt2-small"` | `"gpt2-small-res-jb"` | `[(5, 6), (5, 11), (0, 11)]` (also the default) | `"layer:mid"` (layer 6) |
# | Gemma-2-2B | `"gemma-2-2b"` | `"gemma-scope-2b-pt-res-canonical"` | `[(12, 13), (12, 25), (0, 25)]` (also the default) | `"layer:mid"` (layer 13) |
#
# e.g. `featmatch run-notebook 04 -p MODEL gpt2-small -p SAE_SET gpt2-small-res-jb -p PAIRS "[(5, 6), (5, 11), (0, 11)]"`.
# At 16,384 or 24,576 features, `featmatch.semantic.nearest` never builds a features × features
# array, and `gather(..., evaluate=[(la, lb, matching)])` scores given matchings without the
# dense co-activation matrices this chapter uses at the quick zoo's width.

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

from featmatch import semantic as S
from featmatch.chapters import plots
from featmatch.chapters import semantic_ot as R
from featmatch.chapters.claims import claims_table, write_claims
from featmatch.chapters.display import show_claims
from featmatch.chapters.setup import chapter_defaults, load_setup, save_figure
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import available_judge
from featmatch.lm.activations import gather
from featmatch.lm.corpus import token_batches
from featmatch.saes import sae_set

pd.set_option("display.precision", 3)
pd.set_option("display.float_format", "{:.4g}".format)  # no scientific notation for a whole column
pd.set_option("display.max_colwidth", 200)
T0 = time.perf_counter()

P = chapter_defaults(
    "semantic_ot", PROFILE, PCA_K=PCA_K, N_SAMPLES=N_SAMPLES, N_TOKENS=N_TOKENS, N_JUDGE=N_JUDGE, N_NN=N_NN
)
PCA_K = P["PCA_K"] or None  # 0 -> None: no PCA
N_SAMPLES, N_TOKENS, N_JUDGE, N_NN = P["N_SAMPLES"], P["N_TOKENS"], P["N_JUDGE"], P["N_NN"]
CANDIDATES = CANDIDATES or S.DEFAULT_CANDIDATES

set_name = SAE_SET or f"featmatch-smollm2-{PROFILE}"
all_layers = sorted(sae_set(set_name).layers)
pairs = R.resolve_pairs(PAIRS, all_layers)
layers = sorted({layer for p in pairs for layer in p})
setup = load_setup(MODEL, set_name, layers=layers, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE, scheduler=SCHEDULER)
model_label = f"{MODEL} ({set_name})"
print(
    f"{model_label}: pairs {pairs}; {setup.tokens.shape[0]} eval sequences x {setup.tokens.shape[1]} tokens; "
    f"{CANDIDATES} candidates per feature"
)

# %% [markdown]
# ## Two token slices: distributions from one, scores on the other
#
# The *fit* slice (train split) gives each feature's sampled firing positions, the
# reference space, and the co-activation baseline's correlations; the *eval* slice
# (held-out split, the one every chapter scores on) gives the co-activation statistics
# behind the matching score and the activation correlation, and the contexts the judge
# reads.

# %%
tokens_fit = token_batches(
    setup.tokenizer, n_tokens=N_TOKENS, seq_len=int(setup.tokens.shape[1]), split="train", seed=SEED
)
stats_fit = gather(
    setup.model, setup.saes, tokens_fit, pairs=pairs, n_samples=N_SAMPLES, seed=SEED, progress=False
)
stats_eval = setup.stats(pairs=pairs, n_samples=8, seed=SEED, progress=False)
n_layers = int(setup.model.cfg.n_layers)
_, ref_hook = R.resolve_reference(REFERENCE, n_layers)
print(
    f"fit slice: {stats_fit.n_tokens} positions; eval slice: {stats_eval.n_tokens} positions; reference {ref_hook}"
)

# %% [markdown]
# ## Reference spaces
#
# One forward pass over the fit slice gives every reference space compared below: the
# default (`REFERENCE` with a `PCA_K`-dimensional PCA), the same layer without PCA, the final
# residual stream and the token embedding (both with PCA).

# %%
spaces = R.reference_spaces(setup.model, tokens_fit, R.comparison_spaces(REFERENCE, PCA_K, n_layers))
MAIN_SPACE = next(iter(spaces))
ref = spaces[MAIN_SPACE]
if ref.explained_variance_ratio is not None:
    print(f"{MAIN_SPACE}: the PCA keeps {ref.explained_variance_ratio.sum():.1%} of the variance")
dists = R.feature_distributions(stats_fit, ref, layers, n=N_SAMPLES, seed=SEED)
R.distribution_summary(dists)

# %% [markdown]
# ## Nearest neighbours: moment-bound candidates, exact rerank
#
# Matching needs each feature's *nearest* features, not a good ranking of far-apart pairs.
# `featmatch.semantic.nearest` bounds $W_2$ from below by the distributions' means and spreads,
# $W_2(\mu, \nu)^2 \ge \|m_\mu - m_\nu\|^2 + (\sigma_\mu - \sigma_\nu)^2$,
# takes the `c` features with the smallest bound as candidates, and computes exact $W_2$ on
# those only. On the mid→last pair, `N_NN` query features of A are scored against the
# exact top-10 over *all* features of B (found by the certified search, which also solves
# every feature whose moment lower bound on $W_2$ does not exclude it): recall@1 is the
# share of queries whose nearest feature is found, recall@10 the share of the exact top-10
# returned.

# %%
cmp_pair = R.comparison_pair(pairs)
la, lb = cmp_pair
nn_summary, nn_per_query = R.nearest_recall(
    dists[la], dists[lb], N_NN, sorted({32, CANDIDATES}), k=10, seed=SEED, client=setup.client
)
nn_summary

# %% [markdown]
# ## The matchings on each pair
#
# Eight matchings per pair: four methods, each as a one-to-one assignment and a many-to-one
# top-1. Semantic OT: exact $W_2$ on `CANDIDATES` candidates per feature. Feature Flow: decoder
# cosine (its paper's form is top-1). SAE Match: the folded encoder+decoder MSE (its paper's
# form is the assignment). Co-activation: Pearson correlation of the activations on the
# train split.

# %%
matchings = {}
for pa, pb in pairs:
    t = time.perf_counter()
    matchings[(pa, pb)] = R.pair_matchings(
        dists[pa],
        dists[pb],
        setup.saes[pa],
        setup.saes[pb],
        METHOD,
        CANDIDATES,
        seed=SEED,
        fit_stats=stats_fit,
        pair=(pa, pb),
        client=setup.client,
    )
    print(f"{pa}→{pb}: {len(matchings[(pa, pb)])} matchings in {time.perf_counter() - t:.1f} s")

# %% [markdown]
# ## Scores on the eval split, with confidence intervals
#
# Every mean is over the same features of A for all eight matchings of a pair: those that
# every method matches and that fire on the eval slice (`n_scored`; Semantic OT cannot match
# features without samples on the fit slice). `ms_low`/`ms_high` and `corr_low`/`corr_high`
# are bootstrap 95 % intervals over those features; `chance_ms` and `chance_corr` are the
# scores of random matchings of the same form on the same features. `n_partners` counts the
# distinct features of B a matching uses: a top-1 can collapse onto a few features of B
# (the top-1 of SAE Match's MSE cost picks, for most rows, a feature of B with a small
# folded norm, whatever the row), which the matching score then exposes.

# %%
scores = R.method_scores(stats_eval, matchings, ci=True, chance=True, seed=SEED)
per_feature = R.feature_scores(stats_eval, matchings)
scores[
    [
        "pair",
        "method",
        "form",
        "matching_score",
        "ms_low",
        "ms_high",
        "chance_ms",
        "correlation",
        "chance_corr",
        "n_scored",
        "n_partners",
    ]
]

# %%
fig, axes = plt.subplots(2, 2, figsize=(13, 8))
for row, form in enumerate(("assignment", "top-1")):
    plots.plot_method_scores(
        axes[row, 0],
        scores[scores.form == form],
        "matching_score",
        "matching score P(f_B>0 | f_A>0)",
        f"Matching score, {form} form (eval slice)",
        chance=float(scores[scores.form == form].chance_ms.mean()),
    )
    plots.plot_method_scores(
        axes[row, 1],
        scores[scores.form == form],
        "correlation",
        "Pearson correlation",
        f"Activation correlation, {form} form (eval slice)",
        chance=float(scores[scores.form == form].chance_corr.mean()),
    )
fig.tight_layout()
save_figure(fig, OUT_DIR, "04_method_scores")
plt.show()

# %% [markdown]
# **Figure 1.** Matching score (left; the probability that the matched feature of B fires
# when the feature of A fires) and activation correlation (right) on the held-out slice, for
# each layer pair and method, one-to-one assignments (top row) and many-to-one top-1
# (bottom row); higher is better. The dotted line is the mean chance level of random
# matchings of that form. Compare Semantic OT with the co-activation bars above all: both
# read activations.

# %% [markdown]
# ## The judge
#
# Each judged feature of A is shown with its partner under the paper's three methods and
# the co-activation baseline, so the methods are compared on the same features. A feature's
# text is its top activating contexts on the eval slice. `available_judge` uses an LLM if
# one is configured, otherwise the **offline proxy** (sentence-embedding similarity mapped to
# 1/2/3; not an LLM, and its labels are not comparable in level with the paper's).

# %%
judge = available_judge(variant="examples")
is_proxy = judge.name.startswith("proxy")
judge_label = f"{judge.name} ({'offline proxy, not an LLM' if is_proxy else 'LLM judge'})"
texts = ContextExplanations(stats_eval, setup.tokenizer)
judged_methods = {p: {m: ms[m] for m in (*R.PAPER_METHODS, R.DATA_BASELINE)} for p, ms in matchings.items()}
verdicts = judge.score_many(
    R.judge_sample(texts, stats_eval, judged_methods, N_JUDGE, seed=SEED), progress=False
)
judged = R.judge_table(verdicts)
print("judge:", judge_label)
judged[["pair", "method", "judge_mean", "judge_se", "n_judged", "DIFFERENT", "MAYBE", "SAME"]]

# %%
fig, ax = plt.subplots(figsize=(8, 0.32 * len(judged) + 1.5))
plots.plot_judge_labels(ax, judged, judge_label)
fig.tight_layout()
save_figure(fig, OUT_DIR, "04_judge_labels")
plt.show()

# %% [markdown]
# **Figure 2.** Share of judged feature pairs labelled DIFFERENT (red), MAYBE (amber) and
# SAME (green), per layer pair and method. A better matcher has more green. With the proxy
# judge the absolute level says little; only differences between methods on the same
# features are informative.

# %% [markdown]
# ## Our numbers beside the paper's
#
# The paper's table (LLM judge, scores 1–3) with our row for each analogous pair. Our
# judge is named in the `source` column; our model and SAEs differ from the paper's.

# %%
R.paper_layout(judged, model_label, all_layers, source=f"ours ({judge.name})")

# %% [markdown]
# ## Which reference space?
#
# The same pair (mid→last), matched by Semantic OT in each reference space, every space
# scored on the **same features of A** (matched in every space and by both decoder-vector
# baselines, firing on the eval slice). `diff_vs_best` is the paired difference with the
# better decoder-vector baseline, with its bootstrap interval.

# %%
space_table, baseline_best = R.reference_space_table(
    stats_fit,
    stats_eval,
    spaces,
    MAIN_SPACE,
    cmp_pair,
    matchings[cmp_pair]["Semantic OT"],
    scores,
    n_samples=N_SAMPLES,
    method=METHOD,
    candidates=CANDIDATES,
    seed=SEED,
    baselines={m: matchings[cmp_pair][m] for m in R.BASELINES},
)
space_table

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
plots.plot_reference_spaces(
    axes[0],
    space_table,
    "matching_score",
    "matching score (eval slice)",
    f"Semantic OT {la}→{lb} by reference space",
)
axes[0].axvline(baseline_best, color="k", ls="--", lw=1, label="best decoder-vector baseline")
axes[0].legend(fontsize="small")
plots.plot_reference_spaces(
    axes[1],
    space_table,
    "agreement_with_default",
    "share of features with the same partner",
    "Agreement with the default space",
)
fig.tight_layout()
save_figure(fig, OUT_DIR, "04_reference_spaces")
plt.show()

# %% [markdown]
# **Figure 3.** Left: matching score of the Semantic OT assignment for the mid→last pair in
# each reference space, on one feature set; the dashed line is the better decoder-vector
# baseline on the same features. Right: the share of those features that keep the partner
# they get in the default space.

# %% [markdown]
# ## Where the methods disagree
#
# Features of A (mid→last pair) that Semantic OT and the co-activation baseline send to
# different partners: first those where the Semantic OT partner co-fires more often on the
# eval slice, then those where the co-activation partner does. Each block shows the top
# contexts of the feature of A and of both partners.

# %%
sem, coact = matchings[cmp_pair]["Semantic OT"], matchings[cmp_pair]["Co-activation"]
print(
    R.disagreement_report(
        stats_eval, texts, cmp_pair, sem, coact, names=("Semantic OT", "Co-activation"), n=2
    )
)

# %% [markdown]
# ## Claims
#
# Every row has an effect oriented so that positive supports the claim, a bootstrap 95 %
# interval over its units, a chance level and a tolerance (in the rule column); the verdict
# comes from the one rule of `featmatch.chapters.claims`. Method comparisons are paired over
# the common features of A, per pair and per form: Semantic OT against the better of the two
# decoder-vector baselines (the paper's claim) and against co-activation (ours).

# %%
claims = (
    R.comparison_claims(per_feature, scores, seed=SEED)
    + R.judge_claims(verdicts, scores, judge.name, seed=SEED)
    + [
        R.recall_claim(nn_per_query, CANDIDATES, len(dists[lb]), seed=SEED),
        R.space_claim(space_table, cmp_pair),
    ]
)
table = claims_table(claims)
write_claims(table, OUT_DIR, "04")
show_claims(table)

# %% [markdown]
# ## What this shows, and what it cannot show
#
# Where Semantic OT wins and loses, per pair and form, read from the matching-score rows of
# the table above (a win is a *held* claim; a loss is an interval entirely below zero):

# %%
print("\n".join(R.win_summary(scores, table)))
print()
print("\n".join(R.outcome_summary(table)))
print(f"\nnotebook ran in {time.perf_counter() - T0:.0f} s (profile {PROFILE})")

# %% [markdown]
# **What it shows.** Against the data-free baselines the comparison is tilted: Semantic OT
# reads the activations the scores are computed from. The co-activation baseline reads the
# same kind of data (on the train split, like Semantic OT's distributions), so the rows
# against it are the informative ones; the lines above say on which pairs and in which form
# Semantic OT beats it, loses to it, or cannot be told apart from it. The nearest-neighbour
# row says whether the candidate search returns the exact $W_2$ nearest features, which is
# what the matchings are built on; the reference-space row whether the conclusion against
# the decoder-vector baselines survives another choice of space.
#
# **What it cannot show.** These are SmolLM2-135M and featmatch's own small SAEs (1,024
# features per layer in the quick zoo), not the paper's GPT-2 and Gemma Scope. The judge
# rows are *not testable* offline: the proxy is a sentence-embedding similarity, not an
# LLM. Matching score and correlation measure co-firing on 16k held-out tokens, a narrow
# notion of "the same feature"; the chance levels show how far above random every method
# is, not whether a matched pair means the same thing. The rescaling invariance, the
# perturbation bound and planted recovery of the representation are tested in
# `tests/semantic/`.
