"""Task plugins that ship with fedhpc (registered in pyproject under ``fedhpc.tasks``)."""
