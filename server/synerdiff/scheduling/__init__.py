"""Deciding what each engine iteration runs: planner data types, policies, controller."""
