"""The Compresso method: hard-concrete gates and the Lagrangian, the hooks that apply gates to a stock model,
final 0/1 mask selection, the one-shot baselines and the collaborative prompts (docs/method.md)."""
