"""Cost formulas of a spec, one module per family; `compiler.report` assembles them.

* `model`   parameters (total, active, embedding, head, MTP), KV cache and
            training FLOPs per token; per-op formulas the graph's lowering uses:
            `mla_linears`, `gqa_linears`, `swiglu_linears`, `router_linear`,
            `mla_norm_params`, `gqa_other_params`, `embedding_params`,
            `mtp_extra_params`, `attention_core_flops`, `attention_context`,
            `mla_kv_elements`, `gqa_kv_elements`, `train_flops`, and
            `attention_piece` / `ffn_piece` for whole definitions;
            `model_figures` writes the model section as named formulas.
* `layout`  what each pipeline stage and device holds (`StageContents`), the
            even split used until `partition_stages` provides its own.
* `memory`  memory per GPU per device: weights, master, grads, optimizer,
            activations, dispatch buffers (`weight_bytes`, `activation_bytes`).
* `comm`    EP dispatch/combine with node-limited routing, PP, DP per step.
* `network` multi-plane fat-tree capacity, cost, and what a cluster needs.
* `decode`  the decode speed limit under EP (ISCA 2025 paper, section 2.3).
* `step`    roofline step time, tokens/day, MFU.
* `symbols` the numbers-or-formulas machinery; `fmt` human units.

Every formula is plain arithmetic: numbers in, numbers out; sympy Symbols in,
a formula out (`symbols.Quantities`). Nothing here imports torch, and sympy
only when formulas are asked for.
"""
