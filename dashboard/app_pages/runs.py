"""Runs: launch any job stage from a form generated from its registry entry, follow the jobs (progress bar,
log tail), cancel, resume, re-run with edited parameters, and open the results on the other pages.

The forms come from :data:`core.jobs.STAGES` (one ParamSpec per config field, with its help), so a new stage
or a new config field appears here with no page change. Everything that touches the catalog or starts a
process goes through :mod:`dashboard.queries`, which calls :mod:`core.jobs`: a job is a validated, typed
config run as its own process from an argument list; nothing typed here is ever executed. The queue
advances while this page is open (every ~2 s while a job is queued or running) or under
``prunescope jobs run-queue``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from core.jobs import ACTIVE, DEFAULT_MAX_CPU, DEFAULT_MAX_GPU, STAGES, JobField, Ref
from core.registry import ParamSpec
from dashboard import queries
from dashboard.widgets import md_plain

KEY = "runs_"  # page-local session keys carry this prefix
#: Seconds between refreshes of the Jobs section while a job is queued or running.
REFRESH_S = 2.0
#: The form keeps what was typed while another stage's form is shown, and across page switches.
PERSIST: Literal["session"] = "session"
#: Parameters shown before the "More parameters" expander (required ones are always shown).
MAIN_FIELDS = 6
#: Where a finished stage's result is looked at: (page file, page title, config field naming the output).
RESULTS: dict[str, tuple[str, str, str | None]] = {
    "cluster": ("app_pages/clusters.py", "Clusters", "clustering_id"),
    "prune": ("app_pages/pruning.py", "Pruning", "pruning_id"),
    "similarity": ("app_pages/similarity.py", "Similarity", "analysis_id"),
    "eval-zeroshot": ("app_pages/overview.py", "Overview (Models)", None),
    "eval-corruptions": ("app_pages/robustness.py", "Robustness", None),
}
#: Outputs of stages with no page of their own: (what, config field or None for the run folder).
OUTPUTS: dict[str, tuple[str, str | None]] = {
    "embed": ("embedding set", "set_id"),
    "train-clip": ("checkpoint", None),
    "train-classifier": ("checkpoint", None),
}


def render() -> None:
    """The page: the Launch form beside the Jobs section (a fragment that refreshes while jobs are active)."""
    root = queries.workspace_root()
    st.title("Runs")
    st.caption(f"Jobs run as their own processes, at most {DEFAULT_MAX_CPU} CPU and {DEFAULT_MAX_GPU} GPU "
               "job(s) at once; the others wait in the queue. The queue lives in the catalog: it moves on "
               "while this page is open, or under `prunescope jobs run-queue`.")
    launch, jobs = st.columns([2, 3], gap="large")
    with launch:
        _launch_section(root)
    try:
        active = _has_active(queries.jobs_table(root))
    except PrunescopeError as exc:
        jobs.error(md_plain(exc.one_line()))
        return
    with jobs:
        st.fragment(_jobs_section, run_every=REFRESH_S if active else None)(root, active)



def _has_active(table: pd.DataFrame) -> bool:
    """Whether a job of the table is queued or running."""
    return bool(table["status"].isin(ACTIVE).any())


# -- the launch form ----------------------------------------------------------------------------------
def _launch_section(root: str) -> None:
    """Stage selector, its summary, the generated form and the Queue job button."""
    st.subheader("Launch")
    _apply_fill()
    _resend_form_values()
    names = STAGES.names()
    st.session_state.setdefault(KEY + "stage", "cluster" if "cluster" in names else names[0])
    stage = st.selectbox("Stage", names, key=KEY + "stage", persist_state=PERSIST)
    entry = STAGES.entry(stage)
    st.caption(entry.summary)
    source = st.session_state.get(KEY + "filled_from")
    if source and source[0] == stage:
        st.info(f"Filled from job {source[1]}: edit the parameters and queue it.", icon=":material/edit:")
    params = _form(root, stage)
    if st.button("Queue job", key=KEY + "queue", type="primary", icon=":material/play_arrow:"):
        _queue(root, stage, params)


def _resend_form_values() -> None:
    """Hand the form's values to Streamlit again as session-state values before its widgets are drawn.

    A widget that comes back (the stage was switched away and back) is drawn anew by the browser, which
    shows the widget's own default unless the server sends the value along; the server sends it for values
    set through ``st.session_state`` in the same run. Without this, a stage switch could reset e.g. ``seed``
    to 0 on screen, and the next submit would send that 0.
    """
    for key in [k for k in st.session_state if str(k).startswith((KEY + "p_", KEY + "stage"))]:
        st.session_state[key] = st.session_state[key]


def _form(root: str, stage: str) -> dict[str, Any]:
    """One widget per parameter of ``stage`` (the first :data:`MAIN_FIELDS` and the required ones in view,
    the rest in an expander); returns ``{name: form value}`` for :func:`core.jobs.submit`."""
    specs = STAGES.entry(stage).params
    main = [s for i, s in enumerate(specs) if s.required or i < MAIN_FIELDS]
    more = [s for s in specs if s not in main]
    values = {s.name: _field(root, stage, s) for s in main}
    if more:
        changed = any(_changed(stage, s) for s in more)
        with st.expander(f"More parameters ({len(more)})", expanded=changed):
            values.update({s.name: _field(root, stage, s) for s in more})
    return values


def _queue(root: str, stage: str, params: dict[str, Any]) -> None:
    """Submit the form: one line of error and nothing queued when a parameter is missing or refused."""
    required = [s.name for s in STAGES.entry(stage).params if s.required]
    missing = [name for name in required if params.get(name) in (None, "", [])]
    if missing:
        st.error(f"Fill in the required parameter(s): {md_plain(', '.join(missing))}.")
        return
    try:
        with st.spinner("Queueing..."):
            run_id = queries.submit_job(root, stage, params)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    st.session_state[KEY + "job"] = run_id
    st.session_state.pop(KEY + "filled_from", None)
    st.success(f"Queued {stage} job {run_id}; follow it under Jobs.", icon=":material/schedule:")


# -- widgets of one parameter ---------------------------------------------------------------------------
#: What a selector shows for None: "leave it to the stage" (a select box's own None means "nothing chosen").
UNSET = "(default)"
#: The options of a bool whose None means "decide by yourself" (e.g. cluster's gpu).
TRISTATE = {"auto": None, "yes": True, "no": False}


def _job_field(stage: str, name: str) -> JobField | None:
    """The config field behind a parameter (None for call options such as ``replace``)."""
    return next((f for f in STAGES.get(stage).fields if f.name == name), None)


def _ref(stage: str, name: str) -> Ref | None:
    """The catalog table a parameter names a row of, if any."""
    return next((r for r in STAGES.get(stage).refs if r.field == name), None)


def _widget(stage: str, spec: ParamSpec) -> str:
    """Which widget a parameter gets: ``multi``/``ref`` (names from the catalog), ``choice``, ``tristate``
    (a bool whose None means auto), ``toggle``, ``int`` (a number input), ``json`` or ``text``."""
    field = _job_field(stage, spec.name)
    shape = field.shape if field is not None else "scalar"
    optional = field.optional if field is not None else False
    if _ref(stage, spec.name) is not None:
        return "multi" if shape == "list" else "ref"
    if spec.kind == "choice":
        return "choice"
    if spec.kind == "bool":
        return "tristate" if optional or spec.default is None else "toggle"
    if spec.kind == "int" and spec.default is not None and not optional:
        return "int"
    return "json" if shape == "json" else "text"


def _to_widget(stage: str, spec: ParamSpec, value: Any) -> Any:
    """A parameter value (a default, or a stored config's) as its widget's session value."""
    kind = _widget(stage, spec)
    if kind == "multi":
        items = value.split(",") if isinstance(value, str) else (value or [])
        return [str(v).strip() for v in items if str(v).strip()]
    if kind == "ref":
        return UNSET if value is None else str(value)
    if kind == "choice":
        value = value if value in spec.choices else spec.default
        return UNSET if value is None else value
    if kind == "tristate":
        return next(label for label, v in TRISTATE.items() if v is (None if value is None else bool(value)))
    if kind == "toggle":
        return bool(value)
    if kind == "int":
        return int(value if value is not None else spec.default)
    if value is None:
        return ""
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _key(stage: str, name: str) -> str:
    """The session key of a parameter's widget (per stage, so each stage's form keeps its own values)."""
    return f"{KEY}p_{stage}_{name}"


def _changed(stage: str, spec: ParamSpec) -> bool:
    """Whether a parameter's widget holds something other than its default."""
    key = _key(stage, spec.name)
    return key in st.session_state and st.session_state[key] != _to_widget(stage, spec, spec.default)


def _field(root: str, stage: str, spec: ParamSpec) -> Any:
    """Draw one parameter's widget (seeded with its default) and return its value for ``submit`` (text as
    typed: the stage's config parses and checks it; '' leaves an optional parameter to its default)."""
    key = _key(stage, spec.name)
    kind = _widget(stage, spec)
    st.session_state.setdefault(key, _to_widget(stage, spec, spec.default))
    label = spec.name + (" (required)" if spec.required else "")
    common: dict[str, Any] = {"key": key, "help": spec.help or None, "persist_state": PERSIST}
    if kind in ("multi", "ref"):
        return _ref_widget(root, stage, spec, label, common, multi=kind == "multi")
    if kind == "choice":
        options = [UNSET if c is None else c for c in spec.choices]
        return _unset(st.selectbox(label, options, **common))
    if kind == "tristate":
        return TRISTATE[st.selectbox(label, list(TRISTATE), **common)]
    if kind == "toggle":
        return st.toggle(label, **common)
    if kind == "int":
        lo = None if spec.min is None else int(spec.min)
        hi = None if spec.max is None else int(spec.max)
        return st.number_input(label, min_value=lo, max_value=hi, step=1, **common)
    placeholder = "empty: the default" if spec.default is None else "empty: none"
    if kind == "json":
        return st.text_area(label, height=80, placeholder=placeholder, **common).strip()
    return st.text_input(label, placeholder=placeholder, **common).strip()


def _unset(value: Any) -> Any:
    """A selector's value for ``submit``: :data:`UNSET` becomes None."""
    return None if value == UNSET else value


def _ref_widget(root: str, stage: str, spec: ParamSpec, label: str, common: dict[str, Any], *,
                multi: bool) -> Any:
    """A selector over the catalog rows a parameter may name; a stored value that is gone stays selectable
    (the job is then refused with a one-line error listing what exists)."""
    ref = _ref(stage, spec.name)
    assert ref is not None
    try:
        names = queries.ref_names(root, ref.table, ref.key, ref.role)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        names = []
    current = st.session_state.get(common["key"])
    if multi:
        options = names + [v for v in current or [] if v not in names]
        return st.multiselect(label, options, placeholder=f"choose {ref.what}s", **common)
    options = ([] if spec.required else [UNSET]) + names
    if current not in (None, UNSET) and current not in options:
        options.append(current)
    if not options:
        st.session_state[common["key"]] = None
        st.selectbox(label, [], placeholder=f"no {ref.what} registered yet", **common)
        return None
    if current not in options:
        st.session_state[common["key"]] = options[0]
    return _unset(st.selectbox(label, options, **common))


# -- filling the form from a job ------------------------------------------------------------------------
def _request_fill(stage: str, params: Mapping[str, Any], source: str) -> None:
    """Fill the Launch form on the next full run (its widgets exist already in this one)."""
    st.session_state[KEY + "fill"] = (stage, dict(params), source)
    st.rerun()


def _apply_fill() -> None:
    """Set the Launch form's widgets from a pending fill: the parameters given, defaults for the others."""
    pending = st.session_state.pop(KEY + "fill", None)
    if pending is None:
        return
    stage, params, source = pending
    st.session_state[KEY + "stage"] = stage
    for spec in STAGES.entry(stage).params:
        value = params.get(spec.name, spec.default)
        st.session_state[_key(stage, spec.name)] = _to_widget(stage, spec, value)
    st.session_state[KEY + "filled_from"] = (stage, source)


def _checkpoint(root: str, run_id: str) -> str:
    """The last checkpoint of a training job (absolute: the job process need not share the page's cwd)."""
    return str(Path(root) / "runs" / run_id / "checkpoints" / "last.pt")


#: What to do next with a finished job: (button label, stage, parameters from (root, run id, config)).
FOLLOW_UPS: dict[str, tuple[str, str, Callable[[str, str, Mapping[str, Any]], dict[str, Any]]]] = {
    "embed": ("Cluster this embedding set", "cluster", lambda root, rid, c: {"embedding_set": c["set_id"]}),
    "cluster": ("Prune this clustering", "prune", lambda root, rid, c: {"clustering_id": c["clustering_id"]}),
    "train-clip": ("Evaluate it zero-shot", "eval-zeroshot",
                   lambda root, rid, c: {"model": c.get("model"), "checkpoint": _checkpoint(root, rid)}),
    "train-classifier": ("Evaluate it under corruptions", "eval-corruptions",
                         lambda root, rid, c: {"models": _checkpoint(root, rid),
                                               "dataset": c.get("val_dataset")}),
}


# -- the jobs -----------------------------------------------------------------------------------------
def _jobs_section(root: str, was_active: bool) -> None:
    """The jobs table and the selected job; a fragment that reruns every :data:`REFRESH_S` s while a job is
    queued or running (the queue advances on each run)."""
    st.subheader("Jobs")
    try:
        queries.advance_queue(root)
        table = queries.jobs_table(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    _note_ended(table)
    if _has_active(table) != was_active:
        st.rerun()  # the whole page: the timer starts or stops, the Launch form sees new names
    if table.empty:
        st.info("No jobs yet: choose a stage, fill in its parameters and press Queue job.")
        return
    _table(table)
    ids = table["id"].tolist()
    if st.session_state.get(KEY + "job") not in ids:
        st.session_state[KEY + "job"] = ids[0]
    stages = {i: f"{stage}: {target}" if target else stage
              for i, stage, target in zip(table["id"], table["stage"], table["target"], strict=True)}
    cols = st.columns([4, 1], vertical_alignment="bottom")
    # (no status in the label: the browser keeps a selected option's old label when only the label changes)
    run_id = cols[0].selectbox("Job", ids, key=KEY + "job", format_func=lambda i: f"{i} ({stages[i]})")
    cols[1].button("Refresh", key=KEY + "refresh", icon=":material/refresh:")
    _job(root, run_id)


def _note_ended(table: pd.DataFrame) -> None:
    """Clear the cached catalog reads when a job this session saw queued or running has ended."""
    now = set(table.loc[table["status"].isin(ACTIVE), "id"])
    before = st.session_state.get(KEY + "active_ids", set())
    if before - now:
        queries.clear_result_caches()
    st.session_state[KEY + "active_ids"] = now


def _table(table: pd.DataFrame) -> None:
    """The jobs, newest first, with a progress column (plain cells: nothing in them is rendered)."""
    st.dataframe(table[["id", "stage", "target", "status", "fraction", "started_at", "ended_at"]], key=KEY + "table",
                 hide_index=True, width="stretch", height=min(38 + 35 * len(table), 250), column_config={
                     "id": st.column_config.TextColumn("id", width="medium"),
                     "fraction": st.column_config.ProgressColumn("progress", format="percent", min_value=0.0,
                                                                 max_value=1.0, width="small"),
                     "started_at": st.column_config.DatetimeColumn("started (UTC)", format="MM-DD HH:mm:ss"),
                     "ended_at": st.column_config.DatetimeColumn("ended (UTC)", format="MM-DD HH:mm:ss"),
                 })


def _job(root: str, run_id: str) -> None:
    """The selected job: status, progress, actions, where its result is, its log and parameters."""
    try:
        job = queries.job_detail(root, run_id)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    status, fraction = str(job["status"]), job.get("fraction")
    cols = st.columns(4)
    cols[0].metric("Stage", str(job["stage"]))
    cols[1].metric("Status", status)
    cols[2].metric("Progress", "—" if fraction is None else f"{fraction:.0%}")
    cols[3].metric("Time", _duration(job.get("started_at"), job.get("ended_at")))
    st.progress(float(fraction or 0.0), text=_progress_text(job))
    if job.get("message"):
        st.text(str(job["message"])[-2000:])
    notice = st.session_state.pop(KEY + "notice", None)
    if notice:
        (st.error if notice[0] == "error" else st.success)(md_plain(notice[1]))
    _actions(root, job)
    if status == "done":
        _result(root, job)
    log, params, records = st.tabs(["Log", "Parameters", "Progress records"])
    with log:
        st.caption(f"Last {queries.JOB_LOG_LINES} lines of runs/{run_id}/log.txt")
        st.code(job.get("log_tail") or "(nothing logged yet)", language=None, wrap_lines=True)
    with params:
        st.json({**job.get("config", {}), **job.get("call", {})}, expanded=True)
    with records:
        _history(job.get("history") or [])


def _progress_text(job: Mapping[str, Any]) -> str:
    """One line under the bar: the latest progress record, or why there is none."""
    status, record = job["status"], job.get("progress")
    if status == "queued":
        return f"queued: waiting for a free {job.get('resource', 'cpu')} slot"
    if record:
        parts = []
        done = record.get("done", record.get("step"))
        if done is not None and record.get("total"):
            parts.append(f"{'step ' if 'step' in record else ''}{done:,} of {record['total']:,}")
        parts += [f"{k} {v:.4g}" for k, v in record.items() if k not in ("t", "step", "done", "total")
                  and isinstance(v, int | float) and not isinstance(v, bool)]
        text = ", ".join(parts)
        return f"{status}: {text}" if text else status
    if status == "running":
        return "running: this stage reports its progress when it ends"
    return status


def _duration(started: Any, ended: Any) -> str:
    """Run time so far (or in all) as ``12 s`` / ``3m 04s`` / ``2h 05m`` (short enough for a quarter-width
    metric); ``—`` before the job started."""
    if started is None or pd.isna(started):
        return "—"
    running = ended is None or pd.isna(ended)
    end = pd.Timestamp.now(tz="UTC").tz_localize(None) if running else pd.Timestamp(ended)
    seconds = max(0, int((end - pd.Timestamp(started)).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _actions(root: str, job: Mapping[str, Any]) -> None:
    """Cancel (queued or running), Resume (failed or cancelled), Re-run with these parameters."""
    run_id, status = str(job["id"]), str(job["status"])
    cols = st.columns([1, 1, 2])
    cols[0].button("Cancel", key=KEY + "cancel", icon=":material/stop:", disabled=status not in ACTIVE,
                   on_click=_act, args=(queries.cancel_job, root, run_id, "cancelled"),
                   help="a running job gets SIGTERM (training stops after its current step and checkpoints)")
    cols[1].button("Resume", key=KEY + "resume", icon=":material/replay:",
                   disabled=status not in ("failed", "cancelled"), on_click=_act,
                   args=(queries.resume_job, root, run_id, "queued again"),
                   help="queue it again under the same id: training continues from its checkpoint, the other "
                        "stages skip the work that is finished")
    if cols[2].button("Re-run with these parameters", key=KEY + "rerun", icon=":material/edit:",
                      help="fills the Launch form with this job's parameters, to edit and queue as a new "
                           "job"):
        try:
            stage, params = queries.rerun_params(root, run_id)
        except PrunescopeError as exc:
            st.error(md_plain(exc.one_line()))
            return
        _request_fill(stage, params, run_id)


def _act(action: Callable[[str, str], str], root: str, run_id: str, what: str) -> None:
    """Button callback: run ``action`` on the job and leave a notice for the next run."""
    try:
        with st.spinner("Working..."):
            result = action(root, run_id)
    except PrunescopeError as exc:
        st.session_state[KEY + "notice"] = ("error", exc.one_line())
        return
    done = what if result in (run_id, "cancelled") else f"now {result}"
    st.session_state[KEY + "notice"] = ("success", f"Job {run_id}: {done}.")


def _result(root: str, job: Mapping[str, Any]) -> None:
    """Where a finished job's result is: a link to its page, or its output, and the natural next step."""
    stage, config, run_id = str(job["stage"]), job.get("config", {}), str(job["id"])
    if stage in RESULTS:
        page, title, field = RESULTS[stage]
        if field and config.get(field):
            st.text(f"Result: {field.removesuffix('_id')} {config[field]}")
        st.page_link(page, label=f"Open the result on the {title} page", icon=":material/open_in_new:")
    elif stage in OUTPUTS:
        what, field = OUTPUTS[stage]
        st.text(f"Result: {what} " + (str(config.get(field)) if field else _checkpoint(root, run_id)))
    if stage in FOLLOW_UPS:
        label, next_stage, make = FOLLOW_UPS[stage]
        if st.button(label, key=KEY + "next", icon=":material/arrow_forward:",
                     help=f"fills the Launch form for a {next_stage} job"):
            _request_fill(next_stage, make(root, run_id, config), run_id)


def _history(records: list[dict[str, Any]]) -> None:
    """Every progress record of the job, with the loss curve when the stage reports one (training)."""
    if not records:
        st.caption("This job has written no progress records (embedding, training and corruption grids do).")
        return
    df = pd.DataFrame(records)
    if "t" in df:
        df["t"] = pd.to_datetime(df["t"], unit="s").dt.strftime("%H:%M:%S")
        df = df.rename(columns={"t": "time (UTC)"})
    x = "step" if "step" in df else "done" if "done" in df else None
    if x is not None and "loss" in df and df["loss"].notna().sum() > 1:
        st.line_chart(df, x=x, y="loss", height=220)
    st.dataframe(df.tail(200), hide_index=True, key=KEY + "records", width="stretch")


# -- for the Pruning and Similarity pages ------------------------------------------------------------
def train_on_manifest_button(root: str, pruning_id: str | None, *, key: str) -> None:
    """"Train on this manifest" under a page's saved manifest: queues a ``train-clip`` job on the pool
    restricted to it (:func:`dashboard.queries.train_on_manifest`) and points here. ``key`` carries the
    page's prefix."""
    if not pruning_id:
        return
    st.text(f"Manifest {pruning_id}")
    if st.button("Train on this manifest", key=key, icon=":material/model_training:",
                 help="queue a train-clip job on the pool, restricted to the samples this manifest keeps "
                      "(default parameters; re-run it from the Runs page to change them)"):
        try:
            run_id = queries.train_on_manifest(root, pruning_id)
        except PrunescopeError as exc:
            st.error(md_plain(exc.one_line()))
            return
        st.success(f"Queued train-clip job {run_id}: open the Runs page to follow it.",
                   icon=":material/schedule:")
        st.page_link("app_pages/runs.py", label="Open the Runs page", icon=":material/play_circle:")


if __name__ == "__main__":
    render()
