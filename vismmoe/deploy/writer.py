"""Write a Plan as a deployment YAML: `engine:` (what vismmoe.load reads) and `plan:` (the planner's
choices, memory breakdown and predictions), with the predicted figures repeated in a header comment."""

from __future__ import annotations

from pathlib import Path

import yaml


def plan_yaml(plan) -> str:
    header = ["# Deployment config written by `vismmoe plan`; run with:",
              f"#   vismmoe run --model <{plan.model.name} checkpoint> --config <this file>",
              f"# or check it on a bigger GPU as the device would hold it: add --emulate {_profile_ref(plan.profile)}",
              "# vismmoe.load reads the `engine:` section; `plan:` records what the planner chose and predicts."]
    header += [f"# {line}" for line in plan.summary_lines()]
    return "\n".join(header) + "\n" + yaml.safe_dump(plan.to_dict(), sort_keys=False, width=120)


def _profile_ref(profile) -> str:
    from .profiles import profile_names

    return profile.name if profile.name in profile_names() else profile.path


def write_plan(plan, path) -> Path:
    from ..config import load_config

    text = plan_yaml(plan)
    load_config(yaml.safe_load(text)["engine"])  # never write what the engine config would refuse
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
