"""Pictures: margin curves (plots.margins) and evaluation curves (plots.eval_plots); matplotlib, Agg backend."""
