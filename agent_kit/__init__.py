"""Client SDKs for the Task Manager (placeholder)."""
