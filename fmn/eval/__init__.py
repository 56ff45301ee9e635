"""Measuring a model: M-Score (prompts, detectors, scoring), audits and their reports."""
