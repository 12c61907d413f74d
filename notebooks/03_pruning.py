# %% [markdown]
# # SAE Match as layer pruning
#
# If the features of layer t map to those of layer t+1, a block of the model can be skipped:
# encode the hidden state h_t with SAE t, carry the features over with the matching, and decode them
# with SAE t+1 (encode-permute-decode, Eq. 5). Spliced into the forward pass in place of the real
# h_{t+1}, this costs some cross-entropy (ΔCE, in nats) and explains some of the variance of the
# true hidden state (EV = 1 − Var(ĥ − h)/Var(h)). The paper (Sec. 5.5, Figs. 10, 11) finds that from
# layer 10 of Gemma-2-2B on, pruning this way costs little, and that at lower layers the matched
# prediction is worse than simply encoding and decoding the previous hidden state.
#
# This chapter measures, per layer, on the embedded default:
#
# * folded and unfolded encode-permute-decode against three baselines (App. A): layer drop
#   (h_{t+1} := h_t), encode-decode of the current hidden state (the SAE's own error, nothing
#   pruned) and encode-decode of the previous hidden state (h_{t+1} := SAE_t(h_t));
# * Feature Flow's many-to-one top-1 decoder-cosine transfer;
# * the MSE-quantile hybrid of App. B (Figs. 16, 17), with a random-order control;
# * the sparsity study on the zoo's second-L0 SAEs (Fig. 14) and the early-layer behaviour
#   (Sec. 5.3).
#
# In featmatch's convention a splice at layer t replaces `blocks.{t+1}.hook_resid_post`, i.e. it
# prunes block t+1 (the SAE at t reads `blocks.{t}.hook_resid_post`). Position 0 (BOS) is never
# replaced or scored.

# %% tags=["parameters"]
import os

PROFILE = os.environ.get("FEATMATCH_PROFILE", "quick")  # zoo profile: tiny (tests), quick (CI/book), full
MODEL = "smollm2-135m"  # featmatch model name
SAE_SET = None  # None: the embedded zoo of PROFILE ("featmatch-smollm2-{PROFILE}")
LAYERS = None  # None: every layer of the SAE set
N_TOKENS = None  # evaluation tokens, every splice runs the full model over them; None: 256 on tiny, else 1024
SEED = 0
OUT_DIR = None  # folder for the figures (set by `featmatch run-notebook`)
LAYER_STEP = None  # evaluate every LAYER_STEP-th layer (plus the last one); None: 10 on tiny, else 4
HYBRID_LAYERS = None  # None: at 12%, 38% and 77% of the depth, like the paper's 3, 10, 20 of 26
HYBRID_QS = None  # quantiles q of Eq. 6; None: [0, 0.5, 1] on tiny, else [0, 0.25, 0.5, 0.75, 1]
BATCH_SIZE = 8  # sequences per forward
MIN_THETA = 1e-2  # folded EPD is rerun with pairs whose θ (either side) is below this dropped

# %% [markdown]
# **Other models.** With a network:
#
# | parameter | GPT-2 small | Gemma-2-2B (the paper) |
# |---|---|---|
# | `MODEL` | `"gpt2-small"` | `"gemma-2-2b"` |
# | `SAE_SET` | `"gpt2-small-res-jb"` | `"gemma-scope-2b-pt-res-canonical"` |
# | `LAYERS` | `None` (0–11) | `None` (0–25) |
# | `LAYER_STEP` | `1` | `2` |
# | `HYBRID_LAYERS` | `[1, 5, 9]` | `[3, 10, 20]` (the paper's) |
# | `N_TOKENS` | `4096` | `2048` |
#
# GPT-2's `res-jb` SAEs read `hook_resid_pre`, so a splice at t replaces the input of block t+1
# and prunes block t. The second-L0 study needs the zoo's `-l0b` SAEs and is skipped for hub sets
# (Gemma Scope's other `average_l0_*` SAEs would be its counterpart).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from featmatch.chapters import common, plots, pruning
from featmatch.chapters.claims import claims_table, write_claims
from featmatch.chapters.setup import chapter_defaults, load_setup, save_figure
from featmatch.evaluation import transfer
from featmatch.evaluation.pruning import pruning_sweep

pd.set_option("display.width", 200)

# profile-dependent defaults are resolved here, after papermill has injected the parameters
defaults = chapter_defaults("pruning", PROFILE, N_TOKENS=N_TOKENS, LAYER_STEP=LAYER_STEP, HYBRID_QS=HYBRID_QS)
N_TOKENS, LAYER_STEP, HYBRID_QS = defaults["N_TOKENS"], defaults["LAYER_STEP"], defaults["HYBRID_QS"]
setup = load_setup(MODEL, SAE_SET, LAYERS, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE)
layers = setup.layers
n_layers = int(setup.model.cfg.n_layers)
tokens = setup.tokens
eval_layers = common.every_kth(layers, LAYER_STEP)
print(f"{setup.sae_set}: pruning at layers {eval_layers} with {tokens.numel()} tokens ({tokens.shape[0]} sequences)")

# %% [markdown]
# ## ΔCE and EV per layer (Figs. 10, 11)

# %%
sweep = pruning_sweep(setup.model, tokens, setup.saes, eval_layers, batch_size=BATCH_SIZE, progress=False)
order = list(pruning.METHOD_LABELS)[:6]
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
plots.plot_by_layer(axes[0], sweep, "delta_ce", x="layer", hue="method", labels=pruning.METHOD_LABELS, order=order,
                    title="ΔCE when block t+1 is replaced", xlabel="layer t", ylabel="ΔCE (nats)")
plots.plot_by_layer(axes[1], sweep, "ev", x="layer", hue="method", labels=pruning.METHOD_LABELS, order=order,
                    title="EV of the predicted h(t+1)", xlabel="layer t", ylabel="explained variance")
axes[1].set_ylim(max(-1.0, float(np.nanmin(sweep["ev"])) - 0.05), 1.02)
fig.tight_layout()
save_figure(fig, OUT_DIR, "03_pruning_per_layer")
plt.show()
sweep.pivot_table(index="layer", columns="method", values=["delta_ce", "ev"]).round(3)

# %% [markdown]
# **What to see.** Encode-decode current is the floor set by the SAE's own reconstruction error;
# layer drop shows how much the pruned block matters at all. The paper's claims are that folded
# encode-permute-decode (solid) costs little beyond that floor in the later layers and approaches
# encode-decode previous there, while in the early layers it falls below encode-decode previous.
# Feature Flow claims the many-to-one top-1 cosine transfer explains more variance than any
# permutation. EV below −1 is clipped from the right panel.

# %% [markdown]
# ## Folding and near-zero thresholds
#
# Folded encode-permute-decode carries feature i with the scale θ_B(π(i)) / θ_A(i). Where the zoo's
# training left a threshold at or below zero (floored to 1e-3 when saved), that scale is hundreds
# of times larger than anywhere else, and one such feature can swamp the prediction. To tell
# that conditioning problem apart from the question whether folding helps, folded EPD is run
# again with the pairs whose θ is below `MIN_THETA` on either side left unmatched (they then
# contribute nothing, like any unmatched feature).

# %%
folded_eval = common.pair_matchings(setup.saes, common.next_layer_pairs(eval_layers), ["folded"])["folded"]
guarded = transfer.drop_small_thresholds_by_layer(folded_eval, setup.saes, MIN_THETA)
sweep_guard = pruning_sweep(
    setup.model, tokens, setup.saes, eval_layers,
    [{"method": "encode_permute_decode", "fold": True, "matching": guarded, "label": "encode_permute_decode_folded_min_theta"}],
    batch_size=BATCH_SIZE, progress=False,
)
theta_table = pruning.theta_table(folded_eval, guarded, setup.saes, sweep, sweep_guard)
fig, ax = plt.subplots(figsize=(8, 4))
plots.plot_min_theta(ax, theta_table, MIN_THETA)
fig.tight_layout()
save_figure(fig, OUT_DIR, "03_min_theta")
plt.show()
theta_table.round(3)

# %% [markdown]
# **What to see.** Layers where plain folded EPD collapses (EV far below zero) and a few dropped
# pairs restore it are the conditioning problem, not folding as such. The claims below compare
# folded with unfolded EPD both ways.

# %% [markdown]
# ## The MSE-quantile hybrid (App. B, Figs. 16, 17)
#
# In Eq. 6 the matched features whose match cost is among the lowest fraction q go through the next
# layer's decoder (as in encode-permute-decode) and the rest through the current layer's decoder
# (as in encode-decode previous). q = 1 is encode-permute-decode, q = 0 is encode-decode previous
# with the next layer's decoder bias. If the cost says which matches are good, sending the cheap
# matches first should beat sending a random subset of the same size; the dashed "random" curves
# are that control (the same hybrid with the costs shuffled among the features).

# %%
if HYBRID_LAYERS is None:
    HYBRID_LAYERS = pruning.hybrid_layers(layers, n_layers)
hybrid_matchings = common.pair_matchings(setup.saes, common.next_layer_pairs(HYBRID_LAYERS), ["folded"])["folded"]
hybrid_specs = transfer.hybrid_methods(common.by_first_layer(hybrid_matchings), HYBRID_QS, seed=SEED)
hybrid = pruning.hybrid_table(
    pruning_sweep(setup.model, tokens, setup.saes, HYBRID_LAYERS, hybrid_specs, batch_size=BATCH_SIZE, progress=False)
)
fig, axes = plt.subplots(2, len(HYBRID_LAYERS), figsize=(5 * len(HYBRID_LAYERS), 7), squeeze=False)
for k, t in enumerate(HYBRID_LAYERS):
    plots.plot_hybrid(axes[0, k], hybrid, t, "ev", title=f"layer {t} → {t + 1}: EV")
    plots.plot_hybrid(axes[1, k], hybrid, t, "delta_ce", title=f"layer {t} → {t + 1}: ΔCE")
fig.tight_layout()
save_figure(fig, OUT_DIR, "03_quantile_hybrid")
plt.show()
hybrid.pivot_table(index=["layer", "q"], columns="order", values="ev").round(3)

# %% [markdown]
# **What to see.** How EV and ΔCE change as more matched features are moved to the next layer's
# decoder, and whether choosing them by cost (solid) beats choosing them at random (dashed). The
# paper reads its Figs. 16, 17 as "the lower the MSE, the larger the explained variance".

# %% [markdown]
# ## Sparsity: the second-L0 SAEs (Fig. 14) and similar L0 across layers (Fig. 15)
#
# The zoo trains a second SAE set at another target L0 for a few adjacent layers (`-l0b`). For each
# such pair of layers we run the three SAE-based methods with all four combinations of the two
# sets: both at the main L0, both at the second L0, and the two mixed ones. The paper's observations:
# denser SAEs (higher L0) give a lower ΔCE for every method (Fig. 14), and matching works better
# between SAEs of similar L0 (Sec. 5.3, Fig. 15). The L0 of each SAE is the zoo's held-out value.

# %%
study = pruning.zoo_l0_study(setup.model, tokens, setup.saes, setup.sae_set, PROFILE, batch_size=BATCH_SIZE)
if study.empty:
    print("no second-L0 SAEs for this SAE set: the sparsity study is skipped")
else:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    plots.plot_l0_study(axes[0], study, "delta_ce", "ΔCE (nats)", labels=pruning.METHOD_LABELS)
    plots.plot_l0_study(axes[1], study, "ev", "explained variance", labels=pruning.METHOD_LABELS)
    fig.tight_layout()
    save_figure(fig, OUT_DIR, "03_l0_study")
    plt.show()
    display_cols = ["layer", "variant_a", "variant_b", "l0_a", "l0_b", "method", "delta_ce", "ev"]
    print(study[display_cols].round(3).to_string(index=False))

# %% [markdown]
# **What to see.** Lines join the same-L0 combinations of one method, from the main L0 to the second;
# crosses are the mixed combinations. Same-L0 pairs above their mixed counterparts in EV support
# the paper's L0 explanation.

# %% [markdown]
# ## Early layers (Sec. 5.3)
#
# The paper sees matching fail in the early layers and explains it by large differences in L0
# between adjacent SAEs there. Below: per evaluated layer, the EV that folded encode-permute-decode
# loses against encode-decode previous, next to the relative L0 difference of the two SAEs,
# |L0_t − L0_{t+1}| / mean, measured on the same evaluation tokens.

# %%
l0_stats = setup.stats(layers=common.layers_with_next(eval_layers), top_k=0, n_samples=0, progress=False)
early = pruning.early_layer_table(sweep, l0_stats)
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plots.plot_by_layer(axes[0], early, "ev_shortfall", x="layer", hue=None, title="EV shortfall of folded EPD vs encode-decode previous",
                    xlabel="layer t", ylabel="EV(enc-dec previous) − EV(folded EPD)")
axes[0].axhline(0, color="k", lw=0.8)
plots.plot_by_layer(axes[1], early, "l0_gap", x="layer", hue=None, title="relative L0 difference of SAEs t and t+1",
                    xlabel="layer t", ylabel="|L0_t − L0_{t+1}| / mean L0")
fig.tight_layout()
save_figure(fig, OUT_DIR, "03_early_layers")
plt.show()
early.round(3)

# %% [markdown]
# **What to see.** If the paper's explanation carries over, the layers with a large shortfall (left)
# are those with a large L0 difference (right). The zoo trains every layer towards the same target
# L0, so large L0 differences, and with them this explanation, may simply be absent here.

# %% [markdown]
# ## Claims
#
# Verdicts are computed from the tables above (`featmatch.chapters.pruning`). A claim about a share of
# cases is "held" at 75% or more and "failed" at 25% or less. *Pruning costs little in later
# layers*: the median, over the later two thirds of the layers, of ΔCE(folded EPD) −
# ΔCE(encode-decode current), the cost of pruning beyond the SAE's own reconstruction error;
# "held" at ≤ 0.1 nats, "failed" at ≥ 0.5 nats. *The early-layer drop*: the mean EV of folded EPD
# in the later layers minus that in the first third; "held" at ≥ 0.05, "failed" at ≤ 0. *Its L0
# explanation*: Spearman correlation across layers of the EV shortfall and the L0 difference;
# "held" at ≥ 0.5, "failed" at ≤ 0.

# %%
# the early/later comparison averages EV over layers: it uses folded EPD with the near-zero-θ pairs
# dropped, since a single collapsed layer (EV of −10^4) would decide any mean of the plain one
claims = [
    pruning.claim_pruning_cheap_later(sweep, n_layers),
    common.claim_early_layer_drop(sweep_guard, "ev", n_layers, layer="layer",
                                  claim=f"matched pruning is worse in the early layers (EV; pairs with θ < {MIN_THETA:g} dropped)",
                                  source="SAE Match §5.3, §5.5, Fig. 11"),
    pruning.claim_early_shortfall(early, n_layers),
    pruning.claim_folding_improves_epd(sweep),
    pruning.claim_folding_improves_epd_min_theta(theta_table, MIN_THETA),
    pruning.claim_top1_beats_permutation(sweep),
    pruning.claim_hybrid_cost_order(hybrid),
    pruning.claim_l0_explains_early(early["l0_gap"], early["ev_shortfall"]),
]
if not study.empty:
    claims += [pruning.claim_higher_l0(study), pruning.claim_l0_mismatch(study)]
write_claims(claims, OUT_DIR, "pruning")
claims_table(claims)

# %%
for c in claims:
    print(f"[{c.verdict:>10}] {c.claim}: {c.ours}")

# %% [markdown]
# **Reading the table.** Pruning is scored on a small token budget (`N_TOKENS`) and every
# `LAYER_STEP`-th layer, to keep this chapter within a few minutes on two CPU cores; ΔCE differences
# of a few hundredths of a nat are within noise at this size. A "failed" row says the paper's
# observation does not carry over to this model and these SAEs, and the verdicts of the published
# book come from the quick profile; the tiny profile of the tests uses 128-feature SAEs whose
# verdicts mean little. Plain folded EPD collapses (EV far below zero) at the layers where a pair
# carries a near-zero θ_A (see *Folding and near-zero thresholds*); the claims that average EV over
# layers therefore use the run with those pairs dropped, and the folding claim is shown both ways.
