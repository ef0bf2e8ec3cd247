"""The paths of the rights API (srm_dicom/server/rights.py), shared with the commands that call it.

A module of its own so that ``mdm set-right`` and ``mdm del`` name the endpoint without
importing the server's stack (the storage service, the stager and with them pydicom and
pynetdicom), which is most of their start-up.
"""

RIGHTS = "/api/v1/rights"
DELETE = "/api/v1/delete"
