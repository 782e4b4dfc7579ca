"""DVC stage entry points and the Ray / MLflow orchestration; imports drtune, never the reverse."""
