"""fedmets organ-at-risk (OAR) label convention.

Organ masks exchanged or consumed anywhere in fedmets are single-channel integer label maps
(uint8, same grid as the CT) with 0 = background and one label per structure below. Hospitals
contour OARs with their own names and label numbers; each site maps its local OAR labels to this
convention (e.g. in its site configuration) before feature extraction or training, so that label
``k`` means the same organ at every site. Left/right follow the patient (LPS: +x = patient left).
"""

from __future__ import annotations

ORGAN_LABELS: dict[str, int] = {
    "spinal_cord": 1,
    "mandible": 2,
    "parotid_left": 3,
    "parotid_right": 4,
    "submandibular_left": 5,
    "submandibular_right": 6,
    "larynx": 7,
    "esophagus": 8,
}
"""Structure name -> label value in fedmets organ masks (0 is background)."""

ORGAN_NAMES: dict[int, str] = {v: k for k, v in ORGAN_LABELS.items()}
"""Label value -> structure name (inverse of :data:`ORGAN_LABELS`)."""
