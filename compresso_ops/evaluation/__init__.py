"""Measuring a model: lm-eval tasks, perplexity and speed. The evaluate stage (stages/evaluate.py) runs them."""
