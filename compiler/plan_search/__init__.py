"""`dsvc plan`: search the parallel plan of a spec with the simulator.

* `space`    the candidates: pipeline, expert and data degrees, schedule, micro-batch size
             and count, recomputation and overlap, over what the runtime can run;
* `estimate` a fast analytic step time per candidate from the trainer's kernel costs
             (`passes.simulate_ops`), to order them before anything is simulated;
* `search`   memory first (the report's formulas), then the best estimates simulated in
             full (the pass list: partition, schedule, simulate), the Pareto front and
             why the best rejected candidate was rejected;
* `write`    the chosen plan as a spec: the input file with its values changed.

docs/plan_search.md describes the search; `compiler/cli/cmd_plan.py` is the command.
"""
