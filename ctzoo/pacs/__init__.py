"""The PACS bridge: watch an Orthanc server or listen for DICOM, run zoo models, send DICOM SR/SEG back.

It shares nothing with the HTTP service (:mod:`ctzoo.serve`); both sit on :mod:`ctzoo.inference`.
"""
