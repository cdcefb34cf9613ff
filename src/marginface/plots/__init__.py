"""Pictures: margin curves (plots.margins), evaluation curves (plots.eval_plots), training panels (plots.training)."""
