"""Versioned PostgreSQL schema: migration N brings a catalog from version N-1 to N; never
edit a released one. The same tables as SQLite's (``mdm_catalog_sqlite.schema``, its first six
migrations folded into the first one here), with PostgreSQL's types: 64-bit sizes and
epoch seconds, double-precision times, names in byte order (COLLATE "C", as SQLite
sorts). Header values that DICOM keeps as decimal or integer strings (DS, IS) are TEXT,
as SQLite keeps a value that breaks its VR: nothing a registration reads is refused by a
type; ``mdm_number`` compares them as numbers."""

MIGRATIONS: list[str] = [
    # 1: namespace, per-DN rights, the paper's metadata tables, erased values, stage requests.
    r"""
    CREATE TABLE entries (
        guid TEXT PRIMARY KEY,
        lfn TEXT COLLATE "C" NOT NULL UNIQUE,
        parent TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('slice', 'volume')),
        pfn TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        sop_uid TEXT NOT NULL,
        owner TEXT NOT NULL,
        vo TEXT NOT NULL,
        mode INTEGER NOT NULL,
        metadata_mode TEXT NOT NULL,
        size BIGINT,
        adler32 TEXT,
        content_version INTEGER NOT NULL DEFAULT 1,
        source_digest TEXT,
        created DOUBLE PRECISION NOT NULL,
        modified DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX entries_parent ON entries (parent, name);
    CREATE INDEX entries_uids ON entries (study_uid, series_uid, sop_uid);
    CREATE TABLE directories (path TEXT COLLATE "C" PRIMARY KEY, parent TEXT COLLATE "C" NOT NULL);
    CREATE INDEX directories_parent ON directories (parent, path);
    CREATE TABLE acl (
        guid TEXT NOT NULL REFERENCES entries (guid) ON DELETE CASCADE,
        dn TEXT NOT NULL,
        perms INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (guid, dn)
    );
    CREATE TABLE patient (
        patient_key TEXT PRIMARY KEY,
        name TEXT, patient_id TEXT, issuer TEXT, birth_date TEXT, sex TEXT, age TEXT,
        weight TEXT, size TEXT
    );
    CREATE INDEX patient_name ON patient (name);
    CREATE INDEX patient_id ON patient (patient_id);
    CREATE TABLE image (
        guid TEXT PRIMARY KEY REFERENCES entries (guid) ON DELETE CASCADE,
        patient_key TEXT NOT NULL,
        rows INTEGER, columns INTEGER, bits_allocated INTEGER, bits_stored INTEGER,
        samples_per_pixel INTEGER, photometric TEXT, number_of_frames TEXT,
        pixel_spacing TEXT, slice_thickness TEXT, image_position TEXT,
        image_orientation TEXT, instance_number TEXT,
        pixel_representation INTEGER, rescale_slope TEXT, rescale_intercept TEXT
    );
    CREATE INDEX image_patient ON image (patient_key);
    CREATE TABLE medical (
        guid TEXT PRIMARY KEY REFERENCES entries (guid) ON DELETE CASCADE,
        modality TEXT, study_date TEXT, series_date TEXT, acquisition_date TEXT,
        body_part TEXT, institution TEXT, referring_physician TEXT,
        performing_physician TEXT, study_description TEXT, series_description TEXT,
        manufacturer TEXT, model TEXT
    );
    CREATE INDEX medical_modality ON medical (modality, study_date);
    CREATE INDEX medical_study_date ON medical (study_date);
    CREATE TABLE dicom (
        guid TEXT PRIMARY KEY REFERENCES entries (guid) ON DELETE CASCADE,
        study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_uid TEXT NOT NULL,
        deid_study_uid TEXT NOT NULL, deid_series_uid TEXT NOT NULL,
        deid_sop_uid TEXT NOT NULL, sop_class_uid TEXT, transfer_syntax_uid TEXT
    );
    CREATE INDEX dicom_original ON dicom (study_uid, series_uid, sop_uid);
    CREATE INDEX dicom_deidentified ON dicom (deid_study_uid, deid_series_uid);
    CREATE TABLE protocol (
        name TEXT NOT NULL,
        guid TEXT NOT NULL REFERENCES entries (guid) ON DELETE CASCADE,
        PRIMARY KEY (name, guid)
    );
    CREATE INDEX protocol_guid ON protocol (guid, name);
    CREATE TABLE erased (
        guid TEXT NOT NULL REFERENCES entries (guid) ON DELETE CASCADE,
        path TEXT NOT NULL,
        keyword TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guid, path)
    );
    CREATE TABLE stage_requests (
        id TEXT PRIMARY KEY,
        requester TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        pin_lifetime BIGINT NOT NULL
    );
    CREATE TABLE stage_files (
        request_id TEXT NOT NULL REFERENCES stage_requests (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        lfn TEXT NOT NULL,
        guid TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('SUBMITTED', 'STARTED', 'COMPLETED', 'FAILED', 'CANCELLED')),
        error TEXT,
        started_at BIGINT,
        finished_at BIGINT,
        pin_expires BIGINT,
        released INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (request_id, lfn)
    );
    CREATE INDEX stage_files_guid ON stage_files (guid, state);
    CREATE INDEX stage_files_lfn ON stage_files (lfn);
    CREATE FUNCTION mdm_number(value TEXT) RETURNS DOUBLE PRECISION LANGUAGE sql IMMUTABLE AS
        $$ SELECT CASE WHEN value ~ '^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$'
           THEN value::double precision END $$
    """,
    # 2: the per-frame geometry and rescale of a multi-frame image (JSON, srm_dicom/frames.py),
    # so its volume is planned from the rows alone like a series of single-frame images.
    """
    ALTER TABLE image ADD COLUMN frames TEXT
    """,
    # 3: the SHA-256 of what a grid client receives (hex), beside size and adler32 (SQLite's 8).
    """
    ALTER TABLE entries ADD COLUMN sha256 TEXT
    """,
    # 4: each image's acquisition parameters and diffusion encoding (JSON, srm_dicom/acquisition.py),
    # so a series' sidecars have their size known from the rows alone (SQLite's 9).
    """
    ALTER TABLE image ADD COLUMN acquisition TEXT;
    ALTER TABLE image ADD COLUMN diffusion TEXT
    """,
    # 5: each slice's de-identification record (SQLite's 10; srm_dicom/anonymize.py).
    """
    ALTER TABLE entries ADD COLUMN protection TEXT
    """,
    # 6: staging jobs and their leases (SQLite's 11; README, "Several front ends").
    """
    CREATE TABLE stage_jobs (
        guid TEXT PRIMARY KEY,
        batch TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('SUBMITTED', 'STARTED', 'COMPLETED', 'FAILED')),
        holder TEXT,
        lease_expires DOUBLE PRECISION,
        error TEXT,
        seq BIGINT NOT NULL,
        finished_at DOUBLE PRECISION
    );
    CREATE INDEX stage_jobs_queue ON stage_jobs (state, seq);
    CREATE INDEX stage_jobs_seq ON stage_jobs (seq);
    CREATE INDEX stage_jobs_batch ON stage_jobs (batch, state)
    """,
    # 7: studies and series counted per directory and rights class from an index (SQLite's 12).
    """
    CREATE INDEX entries_rights ON entries (parent, mode, metadata_mode, vo, owner, kind, guid);
    CREATE INDEX acl_dn ON acl (dn)
    """,
    # 8: an entry by the PACS's original UIDs from the index alone (SQLite's 13).
    """
    CREATE INDEX dicom_original_guid ON dicom (study_uid, series_uid, sop_uid) INCLUDE (guid);
    DROP INDEX dicom_original
    """,
    # 9: each slice's Modality on its entry too, in entries_rights (SQLite's 14). The index is
    # dropped before the rows are updated, so the update does not also rewrite it; the new
    # one is built after, once (a large catalog wants a VACUUM afterwards: every entry row is
    # rewritten).
    """
    ALTER TABLE entries ADD COLUMN modality TEXT;
    DROP INDEX entries_rights;
    UPDATE entries e SET modality = m.modality FROM medical m WHERE m.guid = e.guid AND e.kind = 'slice';
    CREATE INDEX entries_rights ON entries (parent, mode, metadata_mode, vo, owner, modality, kind, guid)
    """,
]
