"""masksweep's benchmark harness (issue 5): `python -m bench` / `make bench`, `make bench-smoke`.

One module per figure (fig1_train_loop, fig2_eval, fig3_sweep for figures 3 and 4, fig5_scaling,
fig6_gpu) plus perf_work (the before/after checklist); run.py drives them and report.py writes
bench/results/latest.{md,json}.
"""
