"""Run ids as users type them: a whole MLflow run id, or a unique prefix of 6+ hex digits (as `compare`
prints 8).

The one place every command resolves a run id (`reproduce`, `predict` / `evaluate --run`, `compare --sweep`,
`resume=`), so all of them accept the same forms and word a miss or an ambiguity the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from masksweep.errors import TrackingError
from masksweep.tracking.store import RetryingClient, redact_uri
from masksweep.tracking.tags import TAG_STUDY_NAME, TAG_TRIAL_NUMBER

if TYPE_CHECKING:
    from mlflow.entities import Run

MIN_PREFIX = 6
RUN_ID_LENGTH = 32  # MLflow run ids are uuid4().hex
MAX_LISTED = 5  # matches named in an ambiguity error
_HEX = re.compile(r"[0-9a-f]+")


class RunNotFound(TrackingError):
    """No run has this id, or no run's id starts with this prefix."""


def _allowed() -> str:
    return f"allowed: a run id or a unique prefix of {MIN_PREFIX} or more hex digits"


def find_run(client: RetryingClient, run_id: str, name: str | None = None) -> Run:
    """The run `run_id` names: a whole id (one `get_run`) or a unique prefix (one `search_experiments` page
    walk and one `search_runs` with `attributes.run_id LIKE 'prefix%'`: the store filters, nothing is listed).

    `name` is how the user gave it, in their tool's syntax (e.g. `resume='f97d547f'`, `--run 'f97d547f'`);
    default `run 'f97d547f'`. Raises RunNotFound, or TrackingError naming the matches of an ambiguous prefix.
    """
    from mlflow.exceptions import MlflowException

    text = str(run_id).strip()
    name = name or f"run {text!r}"
    where = redact_uri(client.tracking_uri)
    prefix = text.lower()
    if len(text) >= RUN_ID_LENGTH or len(text) < MIN_PREFIX or not _HEX.fullmatch(prefix):
        try:  # a whole id, or an id of another shape (MLflow accepts any string): looked up as it is
            return client.get_run(text)
        except MlflowException as exc:
            raise RunNotFound(f"{name} not found in {where}; {_allowed()}") from exc
    experiments = _experiment_ids(client)
    if not experiments:
        raise RunNotFound(f"{name} not found in {where} (it has no experiments); {_allowed()}")
    matches = client.search_runs(
        experiments,
        f"attributes.run_id LIKE '{prefix}%'",  # safe to quote: `prefix` is hex digits only
        max_results=MAX_LISTED + 1,
        order_by=["attributes.start_time DESC"],
    )
    if not matches:
        raise RunNotFound(f"{name} not found in {where}; {_allowed()}")
    if len(matches) > 1:
        listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in matches[:MAX_LISTED])
        count = f"more than {MAX_LISTED}" if len(matches) > MAX_LISTED else str(len(matches))
        raise TrackingError(f"{name} is ambiguous: {count} runs start with it: {listed}; give more digits")
    return matches[0]


def resolve_run_id(client: RetryingClient, run_id: str, name: str | None = None) -> str:
    """The whole id of the run `run_id` names (see `find_run`)."""
    return find_run(client, run_id, name).info.run_id


def _experiment_ids(client: RetryingClient) -> list[str]:
    """Every active experiment (a prefix may name a run of any); paged, as a server returns 1000 at most."""
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def quoted(value: str) -> str:
    """A string literal's body in MLflow's filter grammar."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def trial_runs_filter(study_name: str, trial_number: int, status: str) -> str:
    """The MLflow search filter for the runs of one Optuna trial (by its tags) in a given status."""
    return (
        f"tags.`{TAG_STUDY_NAME}` = '{study_name}' and tags.`{TAG_TRIAL_NUMBER}` = '{trial_number}' "
        f"and attributes.status = '{status}'"
    )
