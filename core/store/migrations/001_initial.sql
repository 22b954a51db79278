-- prunescope catalog, schema version 1: the public tables (documented in README.md) and their helpers.
CREATE TABLE datasets (
    name         VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,        -- source kind: image_folder, parquet, webdataset, laion, imagenet_c
    role         VARCHAR NOT NULL,        -- pool | benchmark | reference
    uri          VARCHAR NOT NULL,        -- absolute path of the source root
    n_samples    BIGINT NOT NULL,         -- readable samples (after skips)
    n_skipped    BIGINT NOT NULL,         -- entries skipped as unreadable or invalid
    created_at   TIMESTAMP NOT NULL,
    index_path   VARCHAR,                 -- workspace-relative parquet of the readable samples
    options_json VARCHAR,                 -- resolved reader options
    n_classes    INTEGER,                 -- labelled datasets: number of classes
    has_captions BOOLEAN,
    description  VARCHAR
);

-- Per-reason summary of what a registration skipped (action 'skipped') or repaired ('repaired').
CREATE TABLE dataset_issues (
    dataset  VARCHAR NOT NULL,
    reason   VARCHAR NOT NULL,
    action   VARCHAR NOT NULL,
    count    BIGINT NOT NULL,
    example  VARCHAR,
    PRIMARY KEY (dataset, reason, action)
);

CREATE TABLE embedding_sets (
    id          VARCHAR PRIMARY KEY,
    dataset     VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    pretrained  VARCHAR,
    dim         INTEGER NOT NULL,
    n           BIGINT NOT NULL,
    dtype       VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    modality    VARCHAR DEFAULT 'image',
    images_per_s DOUBLE
);

CREATE TABLE clusterings (
    id            VARCHAR PRIMARY KEY,
    embedding_set VARCHAR NOT NULL,
    k             INTEGER NOT NULL,
    seed          INTEGER NOT NULL,
    path          VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE clusters (
    clustering_id VARCHAR NOT NULL,
    cluster       INTEGER NOT NULL,
    size          BIGINT NOT NULL,
    d_intra       DOUBLE,
    d_inter       DOUBLE,
    complexity    DOUBLE,
    label         VARCHAR,
    PRIMARY KEY (clustering_id, cluster)
);

CREATE TABLE prunings (
    id            VARCHAR PRIMARY KEY,
    methods       VARCHAR NOT NULL,
    config_json   VARCHAR NOT NULL,
    n_in          BIGINT NOT NULL,
    n_kept        BIGINT NOT NULL,
    manifest_path VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE runs (
    id          VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL,
    status      VARCHAR NOT NULL,         -- queued | running | done | failed | cancelled
    config_json VARCHAR,
    seed        INTEGER,
    git_rev     VARCHAR,
    version     VARCHAR,
    started_at  TIMESTAMP,
    ended_at    TIMESTAMP,
    run_dir     VARCHAR,
    pid         INTEGER,
    message     VARCHAR
);

CREATE TABLE metrics (
    run_id      VARCHAR,
    model       VARCHAR,
    dataset     VARCHAR,
    corruption  VARCHAR,                  -- NULL for clean data
    severity    INTEGER DEFAULT 0,        -- 0 for clean data
    adaptation  VARCHAR DEFAULT 'none',
    metric      VARCHAR NOT NULL,
    value       DOUBLE
);

CREATE TABLE reference_results (
    source      VARCHAR NOT NULL,
    model       VARCHAR,
    dataset     VARCHAR,
    corruption  VARCHAR,
    severity    INTEGER DEFAULT 0,
    adaptation  VARCHAR DEFAULT 'none',
    metric      VARCHAR NOT NULL,
    value       DOUBLE
);
