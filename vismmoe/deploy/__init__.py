"""Deployment: device profiles, `vismmoe probe`, and the planner that fits a model to a device."""
