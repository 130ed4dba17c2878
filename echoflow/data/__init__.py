"""EchoFlow data: EchoNet-layout folders, ultrasound DICOM ingest, per-site torch datasets."""

from echoflow.data.dicom import UltrasoundClip, UnusableDicom, pseudonym, read_ultrasound
from echoflow.data.echonet import (
    SPLITS,
    Cohort,
    VideoRecord,
    load_video,
    read_avi,
    read_cohort,
    resize_frames,
    write_avi,
    write_filelist,
)
from echoflow.data.ingest import IngestReport, ingest_dicom
from echoflow.data.sites import (
    ClipDataset,
    FrameDataset,
    PatientPairDataset,
    SiteData,
    load_site,
    load_sites,
    split_sites,
)

__all__ = [
    "SPLITS",
    "ClipDataset",
    "Cohort",
    "FrameDataset",
    "IngestReport",
    "PatientPairDataset",
    "SiteData",
    "UltrasoundClip",
    "UnusableDicom",
    "VideoRecord",
    "ingest_dicom",
    "load_site",
    "load_sites",
    "load_video",
    "pseudonym",
    "read_avi",
    "read_cohort",
    "read_ultrasound",
    "resize_frames",
    "split_sites",
    "write_avi",
    "write_filelist",
]
