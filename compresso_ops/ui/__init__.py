"""What a person sees: live progress, the plan's tables, the report's charts."""
