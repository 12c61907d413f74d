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
N_TOKENS = None  # evaluation tokens, every splice runs the full model over them; None: 256 on tiny, 4096 on quick (32 sequences, the unit of the ΔCE intervals)
SEED = 0
OUT_DIR = None  # folder for the figures (set by `featmatch run-notebook`)
LAYER_STEP = None  # evaluate every LAYER_STEP-th layer (plus the last one); None: 10 on tiny, 6 on quick, 4 on full
HYBRID_LAYERS = None  # None: at 12%, 38% and 77% of the depth, like the paper's 3, 10, 20 of 26
HYBRID_QS = None  # quantiles q of Eq. 6; None: [0, 0.5, 1] on tiny and quick, [0, 0.25, 0.5, 0.75, 1] on full
BATCH_SIZE = 8  # sequences per forward
SCHEDULER = None  # Dask scheduler for the heavy passes: None (here), "local:N" or an address (pip install 'featmatch[distributed]')

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
from IPython.display import Markdown, display

from featmatch.chapters import common, plots, pruning
from featmatch.chapters.claims import claims_table, summary_markdown, write_claims
from featmatch.chapters.display import show_claims
from featmatch.chapters.setup import chapter_defaults, load_setup, save_figure
from featmatch.evaluation import transfer
from featmatch.evaluation.pruning import DEFAULT_METHODS, pruning_sweep

pd.set_option("display.width", 200)

# profile-dependent defaults are resolved here, after papermill has injected the parameters
defaults = chapter_defaults("pruning", PROFILE, N_TOKENS=N_TOKENS, LAYER_STEP=LAYER_STEP, HYBRID_QS=HYBRID_QS)
N_TOKENS, LAYER_STEP, HYBRID_QS = defaults["N_TOKENS"], defaults["LAYER_STEP"], defaults["HYBRID_QS"]
setup = load_setup(MODEL, SAE_SET, LAYERS, n_tokens=N_TOKENS, seed=SEED, profile=PROFILE, scheduler=SCHEDULER)
layers = setup.layers
n_layers = int(setup.model.cfg.n_layers)
tokens = setup.tokens
eval_layers = common.every_kth(layers, LAYER_STEP)
print(f"{setup.sae_set}: pruning at layers {eval_layers} with {tokens.numel()} tokens ({tokens.shape[0]} sequences)")

# %% [markdown]
# ## ΔCE and EV per layer (Figs. 10, 11)

# %%
# the unfolded permutation carried with the folded transfer scale separates the two things folding
# changes at once: the permutation, and the scale θ_B/θ_A each transferred feature is carried with
unfolded_eval = common.by_first_layer(common.pair_matchings(setup.saes, common.next_layer_pairs(eval_layers), ["unfolded"])["unfolded"])
methods = [*DEFAULT_METHODS, {"method": "encode_permute_decode", "fold": True, "matching": unfolded_eval,
                              "label": "epd_unfolded_perm_folded_scale"}]
sweep = pruning_sweep(setup.model, tokens, setup.saes, eval_layers, methods, batch_size=BATCH_SIZE, progress=False)
order = list(pruning.METHOD_LABELS)[:6]
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
plots.plot_by_layer(axes[0], sweep, "delta_ce", x="layer", hue="method", labels=pruning.METHOD_LABELS, order=order,
                    title="ΔCE when block t+1 is replaced", xlabel="layer t", ylabel="ΔCE (nats)")
plots.plot_by_layer(axes[1], sweep, "ev", x="layer", hue="method", labels=pruning.METHOD_LABELS, order=order,
                    title="EV of the predicted h(t+1)", xlabel="layer t", ylabel="explained variance")
axes[1].set_yscale("symlog", linthresh=1.0)  # EV reaches −10^4 at some layers: linear in [−1, 1], log beyond
fig.tight_layout()
save_figure(fig, OUT_DIR, "03_pruning_per_layer")
plt.show()
sweep.pivot_table(index="layer", columns="method", values="delta_ce").rename(columns=pruning.METHOD_LABELS).round(3)

# %% [markdown]
# **What to see.** Encode-decode current is the floor set by the SAE's own reconstruction error;
# layer drop shows how much the pruned block matters at all. The paper's claims are that folded
# encode-permute-decode (solid) costs little beyond that floor in the later layers and approaches
# encode-decode previous there, while in the early layers it falls below encode-decode previous.
# Feature Flow claims the many-to-one top-1 cosine transfer explains more variance than any
# permutation. The EV axis is linear between −1 and 1 and logarithmic beyond, so no layer is
# clipped. The table lists ΔCE (nats) per layer and method.
#
# The SAE quality that the pruning claims take as their precondition, per layer: the ΔCE and EV of
# each SAE's own splice (encode-decode of the current hidden state), beside dropping the block and
# folded encode–permute–decode.

# %%
pruning.splice_quality(sweep).round(3)

# %% [markdown]
# ## The same-layer ceiling
#
# Two SAEs of the *same* layer, trained from different seeds, matched like adjacent layers and
# swapped by encode–permute–decode: nothing is pruned, only the features are exchanged. Its ΔCE is
# the best any cross-layer encode–permute–decode could do with SAEs of this quality; the adjacent
# numbers beside it (where the sweep evaluated that layer) are read against it.

# %%
seed_table = pruning.seed_ceiling_table(setup.model, tokens, setup.saes, common.seed_saes(setup.sae_set, PROFILE), sweep,
                                        batch_size=BATCH_SIZE)
seed_table.round(3)

# %% [markdown]
# ## Folding and near-zero thresholds
#
# Folded encode-permute-decode carries feature i with the scale θ_B(π(i)) / θ_A(i). A threshold near
# zero makes that scale huge, and one such feature can swamp the prediction. The zoo therefore keeps
# θ at or above half the JumpReLU bandwidth *during training* (see `featmatch.saes.zoo`), instead of
# raising thresholds after training. The table counts, per evaluated pair, thresholds below 1% of
# their layer's median (on either side) and the largest transfer scale. The folding claims take
# "no near-zero θ" as a precondition: no feature is dropped from one method only.

# %%
theta_table = pruning.theta_check_table(common.pair_matchings(setup.saes, common.next_layer_pairs(eval_layers), ["folded"])["folded"],
                                        setup.saes)
theta_table.round(3)

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
    display(study.pivot_table(index=["layer", "variant_a", "variant_b"], columns="method", values="delta_ce")
            .rename(columns=pruning.METHOD_LABELS).round(3))

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
# Every row gives what the paper says, our statistic, an effect size oriented so that positive
# supports the claim, its bootstrap 95% interval, the chance level, the rule and the preconditions
# (`featmatch.chapters.claims`). The ΔCE claims resample **sequences**: every method is scored on
# the same sequences, so differences pair per sequence. The preconditions include the SAE's own
# splice quality at the layers used (ΔCE ≤ 0.5 nats and EV ≥ 0.6): where the SAEs themselves break
# the model, a pruning claim is *not testable on this zoo*, not failed. Folding is tested twice: all
# of folding (folded against unfolded EPD), and the permutation alone (folded EPD against the
# unfolded permutation carried with the folded scale).

# %%
claims = [
    *pruning.claim_pruning_cheap_later(sweep, n_layers),
    common.claim_early_layer_drop(sweep[sweep["method"] == "encode_permute_decode_folded"], "ev", n_layers, layer="layer",
                                  claim="matched pruning is worse in the early layers (EV of folded EPD)", chapter="03",
                                  source="SAE Match §5.3, §5.5, Fig. 11", section="ΔCE and EV per layer (Figs. 10, 11)"),
    pruning.claim_early_shortfall(early, n_layers),
    pruning.claim_folding_improves_epd(sweep, theta_table),
    pruning.claim_folding_improves_epd(sweep, theta_table, a="epd_unfolded_perm_folded_scale",
                                       claim="the folded permutation improves EPD at equal transfer scale (ΔCE)",
                                       paper_value="folding finds better partners"),
    pruning.claim_top1_beats_permutation(sweep),
    pruning.claim_hybrid_cost_order(hybrid),
    pruning.claim_l0_explains_early(early["l0_gap"], early["ev_shortfall"]),
]
if not study.empty:
    claims += [pruning.claim_higher_l0(study), pruning.claim_l0_mismatch(study)]
write_claims(claims, OUT_DIR, "03")
table_claims = claims_table(claims)
show_claims(table_claims)

# %% [markdown]
# ## What this shows, and what it cannot show on this zoo
#
# Written from the claims table above.

# %%
Markdown(summary_markdown(table_claims))

# %% [markdown]
# Pruning is scored on `N_TOKENS` tokens and every `LAYER_STEP`-th layer, to keep this chapter
# within minutes on two CPU cores; the intervals over sequences say how far that budget decides
# each claim. Our SAEs are featmatch's quick-profile SAEs (width 1024, trained briefly), not Gemma
# Scope 16k; the SAE-quality preconditions make that explicit per claim. The tiny profile of the
# tests uses 128-feature SAEs whose verdicts mean nothing.
