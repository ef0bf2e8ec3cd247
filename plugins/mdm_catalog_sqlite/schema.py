"""Versioned schema: migration N brings a catalog from version N-1 to N; never edit a released one."""

MIGRATIONS: list[str] = [
    # 1: the namespace, per-DN rights and the paper's five metadata tables.
    """
    CREATE TABLE entries (
        guid TEXT PRIMARY KEY,
        lfn TEXT NOT NULL UNIQUE,
        parent TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('slice', 'volume')),
        pfn TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        sop_uid TEXT NOT NULL,
        owner TEXT NOT NULL,
        vo TEXT NOT NULL,
        mode INTEGER NOT NULL,
        metadata_mode TEXT NOT NULL,
        size INTEGER,
        adler32 TEXT,
        content_version INTEGER NOT NULL DEFAULT 1,
        source_digest TEXT,
        created REAL NOT NULL,
        modified REAL NOT NULL
    );
    CREATE INDEX entries_parent ON entries (parent, name);
    CREATE INDEX entries_uids ON entries (study_uid, series_uid, sop_uid);
    CREATE TABLE directories (path TEXT PRIMARY KEY, parent TEXT NOT NULL);
    CREATE INDEX directories_parent ON directories (parent);
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
        weight REAL, size REAL
    );
    CREATE TABLE image (
        guid TEXT PRIMARY KEY REFERENCES entries (guid) ON DELETE CASCADE,
        patient_key TEXT NOT NULL,
        rows INTEGER, columns INTEGER, bits_allocated INTEGER, bits_stored INTEGER,
        samples_per_pixel INTEGER, photometric TEXT, number_of_frames TEXT,
        pixel_spacing TEXT, slice_thickness REAL, image_position TEXT,
        image_orientation TEXT, instance_number INTEGER
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
    CREATE TABLE dicom (
        guid TEXT PRIMARY KEY REFERENCES entries (guid) ON DELETE CASCADE,
        study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_uid TEXT NOT NULL,
        deid_study_uid TEXT NOT NULL, deid_series_uid TEXT NOT NULL,
        deid_sop_uid TEXT NOT NULL, sop_class_uid TEXT, transfer_syntax_uid TEXT
    );
    CREATE INDEX dicom_original ON dicom (study_uid, series_uid, sop_uid);
    CREATE TABLE protocol (
        name TEXT NOT NULL,
        guid TEXT NOT NULL REFERENCES entries (guid) ON DELETE CASCADE,
        PRIMARY KEY (name, guid)
    )
    """,
    # 2: header values erased by anonymization, kept on the hospital side for "all" rights.
    """
    CREATE TABLE erased (
        guid TEXT NOT NULL REFERENCES entries (guid) ON DELETE CASCADE,
        path TEXT NOT NULL,
        keyword TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guid, path)
    )
    """,
    # 3: stage requests (SRM prepareToGet / WLCG Tape REST) and their pins. No foreign key
    # to entries: a request outlives a deleted entry and reports it as failed.
    """
    CREATE TABLE stage_requests (
        id TEXT PRIMARY KEY,
        requester TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        pin_lifetime INTEGER NOT NULL
    );
    CREATE TABLE stage_files (
        request_id TEXT NOT NULL REFERENCES stage_requests (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        lfn TEXT NOT NULL,
        guid TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('SUBMITTED', 'STARTED', 'COMPLETED', 'FAILED', 'CANCELLED')),
        error TEXT,
        started_at INTEGER,
        finished_at INTEGER,
        pin_expires INTEGER,
        released INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (request_id, lfn)
    );
    CREATE INDEX stage_files_guid ON stage_files (guid, state);
    CREATE INDEX stage_files_lfn ON stage_files (lfn)
    """,
    # 4: lookups by GUID in the Protocol table (metadata, delete) and sorted directory
    # listings without a full scan (measured by tests/bench/bench_catalog.py at 10^6 entries).
    """
    CREATE INDEX protocol_guid ON protocol (guid, name);
    DROP INDEX directories_parent;
    CREATE INDEX directories_parent ON directories (parent, path)
    """,
    # 5: metadata search (``mdm query``, the JSON API, QIDO-RS): patients by name or ID,
    # studies and series by their de-identified UIDs, date ranges (measured by
    # tests/bench/bench_query.py at 10^5 images).
    """
    CREATE INDEX patient_name ON patient (name);
    CREATE INDEX patient_id ON patient (patient_id);
    CREATE INDEX dicom_deidentified ON dicom (deid_study_uid, deid_series_uid);
    CREATE INDEX medical_study_date ON medical (study_date)
    """,
    # 6: the stored voxel type and rescale of each image, so a volume keeps its integers
    # (NIfTI scl_slope/scl_inter) and its size is known from the rows alone.
    """
    ALTER TABLE image ADD COLUMN pixel_representation INTEGER;
    ALTER TABLE image ADD COLUMN rescale_slope REAL;
    ALTER TABLE image ADD COLUMN rescale_intercept REAL
    """,
    # 7: the per-frame geometry and rescale of a multi-frame image (JSON, srm_dicom/frames.py),
    # so its volume is planned from the rows alone like a series of single-frame images.
    """
    ALTER TABLE image ADD COLUMN frames TEXT
    """,
    # 8: the SHA-256 of what a grid client receives (hex), beside size and adler32, for the
    # RFC 9530 Repr-Digest and the RFC 3230 Digest of HEAD and GET (README, "Digests").
    """
    ALTER TABLE entries ADD COLUMN sha256 TEXT
    """,
    # 9: each image's acquisition parameters and diffusion encoding (JSON, srm_dicom/acquisition.py),
    # so a series' sidecars (3D.json, 3D.bval, 3D.bvec) have their size known from the rows alone.
    """
    ALTER TABLE image ADD COLUMN acquisition TEXT;
    ALTER TABLE image ADD COLUMN diffusion TEXT
    """,
    # 10: each slice's de-identification record (options, profile, rules version), so that
    # restaging an entry protects it as it was registered (srm_dicom/anonymize.py).
    """
    ALTER TABLE entries ADD COLUMN protection TEXT
    """,
    # 11: staging jobs, one per GUID for the site: which front end holds each (its lease, on
    # the database's clock) and how it ended, so that several front ends on one catalog
    # retrieve each file once and finish what a dead one left (README, "Several front ends").
    """
    CREATE TABLE stage_jobs (
        guid TEXT PRIMARY KEY,
        batch TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('SUBMITTED', 'STARTED', 'COMPLETED', 'FAILED')),
        holder TEXT,
        lease_expires REAL,
        error TEXT,
        seq INTEGER NOT NULL,
        finished_at REAL
    );
    CREATE INDEX stage_jobs_queue ON stage_jobs (state, seq);
    CREATE INDEX stage_jobs_seq ON stage_jobs (seq);
    CREATE INDEX stage_jobs_batch ON stage_jobs (batch, state)
    """,
    # 12: QIDO-RS studies and series counted per directory and rights class from an index
    # alone, in directory order (no sort, no table row read: 3x faster at 10^5 images,
    # tests/bench/bench_query.py); whether a caller has any per-DN entry at all.
    """
    CREATE INDEX entries_rights ON entries (parent, mode, metadata_mode, vo, owner, kind, guid);
    CREATE INDEX acl_dn ON acl (dn)
    """,
    # 13: an entry by the PACS's original UIDs from the index alone, its GUID in it: no dicom row
    # read besides, one B-tree descent fewer per lookup (tests/bench/bench_catalog.py at 10^6).
    """
    CREATE INDEX dicom_original_guid ON dicom (study_uid, series_uid, sop_uid, guid);
    DROP INDEX dicom_original
    """,
    # 14: each slice's Modality on its entry too, in entries_rights after the rights columns, so
    # QIDO-RS ModalitiesInStudy is grouped from that index alone rather than probed in the
    # Medical table once per series (README, "QIDO-RS at scale"); the Medical table stays
    # where searches read it. Existing slices take theirs from the Medical table.
    """
    ALTER TABLE entries ADD COLUMN modality TEXT;
    DROP INDEX entries_rights;
    UPDATE entries SET modality = (SELECT m.modality FROM medical m WHERE m.guid = entries.guid)
        WHERE kind = 'slice';
    CREATE INDEX entries_rights ON entries (parent, mode, metadata_mode, vo, owner, modality, kind, guid)
    """,
]
