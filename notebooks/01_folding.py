# %% [markdown]
# # Folding thresholds into the weights
#
# SAE Match (Balagansky et al., ICLR 2025) pairs the features of two SAEs by solving a linear
# assignment problem on the distance between their parameters (Eq. 3). Before that, it *folds*
# each JumpReLU threshold θ into the weights (Eq. 4): the encoder column is divided by θ and the
# decoder row multiplied by it. The SAE still computes the same reconstruction, but the scale of
# each feature moves from θ into the decoder. The paper argues that θ carries the growth of the
# hidden-state norm across layers (Fig. 1), and so folding should make matching better
# (Hypothesis 2).
#
# This chapter reproduces the folding experiments on the embedded default: SmolLM2-135M with the
# residual SAEs that featmatch trains itself (the zoo). It shows:
#
# * θ and the hidden-state norm per layer (Fig. 1);
# * the parameter MSE of vanilla, unfolded and folded matching, scored in the folded scale (Fig. 3);
# * the matching score of folded and unfolded matching per layer (Fig. 7, right);
# * encoder-only, decoder-only and encoder + decoder matching (Fig. 12);
# * Feature Flow's claim that folding barely changes the permutation unless the encoder bias is
#   included;
# * match cost against matching score, and the best and worst matched pairs (Figs. 5, 6);
# * judge labels per layer for folded and unfolded matches (Figs. 4, 7 left);
# * a claims table at the end.
#
# All computation happens in the `featmatch` library (`featmatch.chapters.folding` for the tables and
# `featmatch.chapters.plots` for the figures); this notebook only sets parameters, calls it, and comments.

# %% tags=["parameters"]
import os

PROFILE = os.environ.get("FEATMATCH_PROFILE", "quick")  # zoo profile: tiny (tests), quick (CI/book), full
MODEL = "smollm2-135m"  # featmatch model name
SAE_SET = None  # None: the embedded zoo of PROFILE ("featmatch-smollm2-{PROFILE}")
LAYERS = None  # None: every layer of the SAE set
N_TOKENS = None  # evaluation tokens (held-out split); None: 2048 on the tiny profile, else 16384
SEED = 0
OUT_DIR = None  # folder for the figures (set by `featmatch run-notebook`)
MIN_FIRES = 5  # a feature must fire this often to be shown, sampled or judged
N_JUDGE = None  # matched pairs judged per layer pair and variant; None: 6 on tiny, else 12
JUDGE_VARIANT = "examples"  # the judge compares activating contexts ("explanations" for Neuronpedia texts)
SCHEDULER = None  # Dask scheduler for the heavy passes: None (here), "local:N" or an address (pip install 'featmatch[distributed]')

# %% [markdown]
# **Other models.** With a network, the same notebook runs on the paper's setting or on GPT-2:
#
# | parameter | GPT-2 small | Gemma-2-2B (the paper) |
# |---|---|---|
# | `MODEL` | `"gpt2-small"` | `"gemma-2-2b"` |
# | `SAE_SET` | `"gpt2-small-res-jb"` | `"gemma-scope-2b-pt-res-canonical"` |
# | `LAYERS` | `None` (0–11) or a few layers | e.g. `list(range(8, 14))` |
# | `N_TOKENS` | `16384` | `8192` |
#
# e.g. `featmatch run-notebook 01_folding -p MODEL gemma-2-2b -p SAE_SET gemma-scope-2b-pt-res-canonical -p LAYERS "[8,9,10,11,12,13]"`.
# GPT-2's `res-jb` SAEs are ReLU SAEs with no threshold (θ = 1), so folding is the identity and
# folded and unfolded matching must agree there, which is a useful check. Their 24,576 features
# and Gemma Scope's 16,384 make the pair statistics large (`2 × 8 × F²` bytes per layer pair, about
# 4.3 GB at 16k), so choose a few layers. Neuronpedia explanations (`featmatch.judging.explanations`) can
# replace the context summaries with `JUDGE_VARIANT = "explanations"`.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from featmatch.chapters import common, folding, plots
from IPython.display import Markdown
from featmatch.chapters.claims import claims_table, summary_markdown, write_claims
from featmatch.chapters.display import show_claims
from featmatch.chapters.setup import chapter_defaults, load_setup, save_figure
from featmatch.judging.explanations import ContextExplanations
from featmatch.judging.judges import available_judge, label_counts

pd.set_option("display.max_colwidth", 120)
pd.set_option("display.width", 200)

# profile-dependent defaults are resolved here, after papermill has injected the parameters
defaults = chapter_defaults("folding", PROFILE, N_TOKENS=N_TOKENS, N_JUDGE=N_JUDGE)
N_TOKENS, N_JUDGE = defaults["N_TOKENS"], defaults["N_JUDGE"]
setup = load_setup(MODEL, SAE_SET, LAYERS, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE, scheduler=SCHEDULER)
layers = setup.layers
pairs = common.adjacent_pairs(layers)
n_layers = int(setup.model.cfg.n_layers)
stats = setup.stats(pairs=pairs, progress=False)
explanations = ContextExplanations(stats, setup.tokenizer)
print(f"{setup.sae_set}: {len(layers)} SAEs of width {stats.d_sae(layers[0])} on {MODEL} ({n_layers} layers)")
print(f"{stats.n_tokens} evaluation tokens (BOS excluded), {len(pairs)} adjacent layer pairs")

# %% [markdown]
# We match every adjacent pair of layers with six variants of SAE Match: the paper's method
# (encoder + decoder, folded), the same unfolded, encoder-only and decoder-only (both folded), and
# the encoder + decoder variants that also compare the encoder bias `b_enc`, folded and unfolded.

# %%
matchings = common.pair_matchings(setup.saes, pairs, list(common.MATCH_VARIANTS))
scores = folding.score_table(stats, matchings)
scores.pivot_table(index="variant", values=["matching_score", "correlation"], aggfunc="mean").round(3)

# %% [markdown]
# ## The same-layer ceiling
#
# How well do two SAEs of the *same* layer, trained from different seeds, match? That is the
# ceiling for every cross-layer number in this chapter: adjacent layers cannot share more features
# than two seeds of one layer do. The zoo retrains a few layers with a second seed (`seed2`); each
# pair is matched exactly as adjacent layers are (folded SAE Match) and scored on the same tokens.
# Where even the seeds match poorly, the cross-layer claims below are *not testable on this zoo*.

# %%
ceiling = common.seed_ceiling_scores(setup.model, setup.tokens, setup.saes, common.seed_saes(setup.sae_set, PROFILE),
                                     scores, min_fires=MIN_FIRES)
ceiling.round(3)

# %% [markdown]
# ## θ and the hidden-state norm (Fig. 1)

# %%
norms = folding.threshold_norm_table(setup.saes, stats)
dyn = folding.norm_dynamics_table(setup.saes, stats, matchings["folded"])
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
plots.plot_threshold_norm(axes[0], norms, "mean θ and mean ‖h‖ per layer")
plots.plot_threshold_norm(axes[1], norms, "folded decoder norm and ‖h‖ per layer", left="folded_dec_norm_mean",
                          left_label="mean folded decoder norm ‖θ·W_dec‖")
plots.plot_norm_dynamics(axes[2], dyn, "norm changes t → t+1 (points labelled t)")
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_theta_norm")
plt.show()
r = folding.norm_correlations(norms, dyn)
print(f"Pearson r over layers: mean θ vs ‖h‖ = {r['theta']:.2f}; folded decoder norm vs ‖h‖ = {r['dec']:.2f}; "
      f"their changes t → t+1: {r['dyn']:.2f}")

# %% [markdown]
# **What to see.** Left: in Gemma Scope, mean θ rises with the hidden-state norm ‖h‖ (the paper's
# Fig. 1). Middle: the folded decoder norm ‖θ·W_dec‖, which is where the scale of each feature
# lives after folding. Right: for each pair of layers, the change of ‖h‖ against the change of the
# matched folded decoder norms; the paper's argument needs the points to rise together.
#
# **Which parametrisation the claim is about.** A JumpReLU SAE can be rewritten with θ, W_enc and
# W_dec rescaled per feature without changing what it computes, so "θ tracks ‖h‖" depends on how
# the SAE was trained and saved. The zoo trains with sae-lens's `normalize_activations =
# expected_average_only_in`: inputs are rescaled to a fixed average norm and the factor is folded
# into W_enc / W_dec when saving, so θ stays in normalised units and *cannot* follow ‖h‖ whatever
# the model does. For such SAEs the θ row of the claims table is **not testable** (its precondition
# says why); it is testable on SAEs trained on raw inputs, like Gemma Scope. Folding makes the claim
# independent of the parametrisation: the folded decoder norm ‖θ·W_dec‖ is the size of the smallest
# write a feature makes when it fires, in the units of h. The claim tested on this zoo is therefore
# the right panel, on **per-layer changes** (a correlation of levels across depth would pass for any
# depth trend). Part of that correlation comes from the normalisation factor itself, which scales
# W_dec by the mean ‖h‖ of each layer; the chance level (shuffled transitions) does not remove it.

# %% [markdown]
# ## Parameter MSE in the folded scale (Fig. 3)
#
# Each variant finds its permutation in its own scale; the MSE of the matched encoder columns and
# decoder rows is then always computed on *folded* parameters, as in the paper. "Vanilla" is no
# permutation at all.

# %%
mse = folding.parameter_mse_table(setup.saes, matchings, parts=("encoder", "decoder"))
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, part in zip(axes, ("encoder", "decoder"), strict=True):
    plots.plot_by_layer(ax, mse[mse["part"] == part], "mse", order=["vanilla", "unfolded", "folded"], logy=True,
                        labels={"vanilla": "vanilla (no permutation)", "unfolded": "matched, unfolded", "folded": "matched, folded"},
                        title=f"{part}: MSE of matched parameters (folded scale)", xlabel="layer t (pair t → t+1)",
                        ylabel="MSE (folded scale, log)")
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_parameter_mse")
plt.show()
mse.pivot_table(index="part", columns="variant", values="mse", aggfunc="median")

# %% [markdown]
# **What to see.** The feature order of two independently trained SAEs is arbitrary, so if matching
# finds a real correspondence, both matched variants lie clearly below vanilla; the size of that
# gap is a data-free measure of how alike the two dictionaries are. Folded matching minimises exactly the scored
# quantity, so it is never above unfolded matching on the sum over both parts; the interesting
# question is how large the gap is. A gap near zero means that θ varies little within a layer, so
# folding barely changes which permutation is optimal.

# %% [markdown]
# ## Matching score: folded against unfolded (Fig. 7, right)
#
# The matching score is featmatch's definition of the paper's "probability of paired feature
# activation": P(f_B[π(i)] > 0 | f_A[i] > 0) on the same tokens, averaged over the features of A
# that fire. We also report the Pearson correlation of the two activations.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, metric in zip(axes, ("matching_score", "correlation"), strict=True):
    plots.plot_by_layer(ax, scores, metric, order=["folded", "unfolded"],
                        labels={"folded": "folded + matched", "unfolded": "matched (unfolded)"},
                        title=f"{metric.replace('_', ' ')} per layer pair", xlabel="layer t (pair t → t+1)",
                        ylabel={"matching_score": "matching score P(f_B>0 | f_A>0)", "correlation": "activation correlation"}[metric])
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_score_folded_unfolded")
plt.show()

# %% [markdown]
# **What to see.** Where the folded curve lies above the unfolded one, folding helps (Hypothesis 2).
# The curves' shape over depth shows the early-layer behaviour of Sec. 5.3: the paper sees lower
# quality before layer 10 of 26.

# %% [markdown]
# ## Which parameters to compare (Fig. 12)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
plots.plot_by_layer(ax, scores, "matching_score", order=["encoder", "decoder", "folded"],
                    labels={"encoder": "encoder only", "decoder": "decoder only", "folded": "encoder + decoder"},
                    title="matching score by the parameters compared (all folded)", xlabel="layer t (pair t → t+1)",
                    ylabel="matching score")
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_encoder_decoder")
plt.show()

# %% [markdown]
# **What to see.** The paper reports (between layers 19 and 20 of Gemma) that decoder-only is on par
# with encoder + decoder and encoder-only is clearly worse. Here the comparison runs over every
# pair of layers.

# %% [markdown]
# ## Does folding change the permutation? (Feature Flow)
#
# Feature Flow (Laptev et al. 2025) reports that folding barely changes the permutation unless the
# encoder bias `b_enc` is part of the compared vectors. We count the features of layer t whose
# match changes when folding is switched on, without and with `b_enc`, and the effect of adding
# `b_enc` to folded matching.

# %%
changes = folding.folding_change_table(matchings)
fig, ax = plt.subplots(figsize=(7, 4))
plots.plot_by_layer(ax, changes, "frac_changed", hue="comparison", title="share of features whose match changes",
                    xlabel="layer t (pair t → t+1)", ylabel="share of features of layer t")
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_folding_changes")
plt.show()
changes.groupby("comparison")["frac_changed"].describe()[["mean", "50%", "min", "max"]].round(3)

# %% [markdown]
# **What to see.** "fold, no b_enc" is Feature Flow's "barely changes" case; "fold, with b_enc"
# switches folding on and off with the bias included in both; "b_enc (folded)" is the effect of the
# bias alone. How the paper's gains and Feature Flow's "barely" fit together depends on how much θ
# varies within a layer.

# %% [markdown]
# ## Cost against matching score, best and worst pairs (Figs. 5, 6)
#
# For one pair of layers at about two thirds of the depth (the paper uses layers 19 → 20 of 26),
# every matched feature: its folded MSE cost against its matching score. Then, for every pair, the
# Spearman rank correlation of the two (Hypothesis 1 expects it to be negative).

# %%
focus = folding.focus_pair(pairs)
feats = folding.feature_table(stats, *focus, matchings["folded"][focus])
rhos = folding.cost_score_correlations(stats, matchings["folded"], min_fires=MIN_FIRES)
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plots.plot_cost_vs_score(axes[0], feats, min_fires=MIN_FIRES, title=f"layers {focus[0]} → {focus[1]}, folded matching")
plots.plot_by_layer(axes[1], rhos, "rho", hue=None, title="Spearman ρ(cost, matching score) per pair",
                    xlabel="layer t (pair t → t+1)", ylabel="Spearman ρ")
axes[1].axhline(0, color="k", lw=0.8)
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_cost_vs_score")
plt.show()
print(f"median ρ(cost, score) over pairs: {rhos['rho'].median():.2f}; median ρ(cost, lift over the partner's firing rate): "
      f"{rhos['rho_lift'].median():.2f}")

# %% [markdown]
# **What to see.** Left: if a low cost means a good match, the points and the red decile means
# slope downwards. Right: the same correlation for every pair of layers; below zero supports
# Hypothesis 1.
#
# The cheapest and the most costly matches of the same pair, with their strongest activating
# contexts (the active token in «»), are the analogue of the paper's Fig. 5:

# %%
folding.best_worst_pairs(feats, explanations, n=4, min_fires=MIN_FIRES)

# %% [markdown]
# **What to see.** Cheap pairs should fire on the same tokens in the same contexts; costly pairs
# are where SAE Match found no counterpart and paired two unrelated features.

# %% [markdown]
# ## Judge labels per layer (Figs. 4, 6, 7 left)
#
# The paper asks an LLM to label matched pairs DIFFERENT (1), MAYBE (2) or SAME (3) from their
# Neuronpedia explanations. featmatch uses the LLM judge when one is configured (an API key in
# `FEATMATCH_JUDGE_API_KEY` or `OPENAI_API_KEY`) and otherwise an **offline proxy that is not an
# LLM**: the cosine similarity of MiniLM sentence embeddings, mapped to 1/2/3 by thresholds
# calibrated on short explanations (`docs/judges.md`). Both see the same context summaries of the
# two features. The same sample of features of layer t is judged for folded and unfolded matching.

# %%
judge = available_judge(variant=JUDGE_VARIANT)
print(f"judge: {judge!r}")
# random pairs of the same features of layer t are the chance level of the labels
judged = common.judge_matched_pairs(judge, explanations, stats, {"folded": matchings["folded"], "unfolded": matchings["unfolded"],
                                                                 "random": common.random_matchings(matchings["folded"], seed=SEED)},
                                    N_JUDGE, min_fires=MIN_FIRES, seed=SEED)
counts = label_counts(judged, by=["matching", "layer_a"])
judge_name = common.judge_names(judged)
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
for ax, v in zip(axes[:2], ("folded", "unfolded"), strict=True):
    plots.plot_label_distribution(ax, counts[counts["matching"] == v], title=f"{v} matching: labels by {judge_name}",
                                  chance=common.label_share(judged, "random"))
    ax.set_xlabel("layer t (pair t → t+1)")
plots.plot_cost_by_label(axes[2], judged[judged["matching"] == "folded"], title="folded match cost by label")
fig.tight_layout()
save_figure(fig, OUT_DIR, "01_judge_labels")
plt.show()
label_counts(judged, by="matching")

# %% [markdown]
# **What to see.** The share of SAME (green) per layer for folded and unfolded matching, with the
# SAME share of randomly paired features as the chance line (the paper:
# near zero before layer 10, rising after, more optimistic with folding), and on the right whether
# pairs labelled SAME have lower match costs (Fig. 6). With the proxy, a label says how similar the
# two context summaries are in a sentence-embedding space, not what an LLM would answer.

# %% [markdown]
# ## Claims
#
# Every row gives what the paper says, our statistic, an **effect size oriented so that positive
# supports the claim**, its bootstrap 95% confidence interval over the stated unit (layer pairs,
# layer transitions or layers), the chance level from a null (shuffled costs, shuffled layer
# labels, or no difference), the rule and the preconditions (`featmatch.chapters.claims`). The
# verdict is *held* when the interval excludes zero and the effect reaches the tolerance,
# *failed* when the whole interval lies below the tolerance, *not testable* when a precondition
# fails, the two sides cannot differ by construction, or the interval is wider than the
# tolerance, and *mixed* otherwise. The early layers are the first third of the model's depth
# (the paper's layers 0–9 of 26).

# %%
same_pair_scores = scores[scores["variant"].isin(["folded", "unfolded"])]
claims = [
    *folding.claim_theta_tracks_norm(norms, dyn, theta_carries_scale=folding.theta_carries_scale(setup.saes[layers[0]])),
    folding.claim_cost_reflects_similarity(folding.feature_tables(stats, matchings["folded"]), min_fires=MIN_FIRES,
                                           preconditions=common.ceiling_precondition(ceiling)),
    folding.claim_folding_improves(same_pair_scores, preconditions=common.ceiling_precondition(ceiling)),
    folding.claim_folding_improves(same_pair_scores, metric="correlation", preconditions=common.ceiling_precondition(ceiling)),
    *folding.claim_encoder_decoder(scores),
    common.claim_early_layer_drop(scores[scores["variant"] == "folded"], "matching_score", n_layers,
                                  section="Matching score: folded against unfolded (Fig. 7, right)"),
    *folding.claim_folding_barely_matters(changes),
    folding.claim_judge_folding(judged),
    folding.claim_judge_cost(judged),
]
write_claims(claims, OUT_DIR, "01")
table = claims_table(claims)
show_claims(table)

# %% [markdown]
# ## What this shows, and what it cannot show on this zoo
#
# Written from the claims table above; the verdicts, effects and reasons below are the table's.

# %%
Markdown(summary_markdown(table))

# %% [markdown]
# The limits that hold for every row: the SAEs are featmatch's own (width 1024 on the quick
# profile, trained briefly on normalised inputs with a fixed target L0), not Gemma Scope; the
# judge is the offline proxy unless an LLM is configured, and it reads activating contexts where
# the paper's judge read Neuronpedia explanations; and the units are the model's 29 adjacent
# layer pairs, so intervals over layer pairs are wide. A *failed* row says the paper's observation
# does not carry over to this model and these SAEs; a *not testable* row says our setup cannot
# decide it. The tiny profile of the tests uses 128-feature SAEs on a few thousand tokens, whose
# verdicts mean nothing.
