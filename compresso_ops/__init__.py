"""compresso-ops: declarative structured pruning with the Compresso method.

Importing the package stays light (no torch, no transformers) so that `validate` and `plan` start at once.
`import compresso_ops.models.modeling_compresso` registers the native export class with transformers' Auto
classes; every stage that loads a model imports it.
"""
