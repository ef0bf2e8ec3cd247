"""DICOM networking: a client for the site's PACS and an embedded Query/Retrieve PACS.

Importing this package turns TCP_NODELAY on for every pynetdicom socket and quiets
pynetdicom's own logger: it logs multi-line errors and, at INFO/DEBUG, the UIDs of the
images it moves (PHI); our PacsError carries the one line a person needs.
"""

import logging

from srm_dicom.pacs import nodelay

nodelay.install()
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
