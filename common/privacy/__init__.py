"""Privacy accounting and the privacy ledger, shared by the hospitals, the server's reports and
the local simulations."""

#: Why data without patient identities cannot train at the patient unit, and the two ways out
#: (what the hospital, `xrayfed demo` and `xrayfed simulate` say, after naming the data).
NO_PATIENT_IDS = ("carries no patient identities, so the privacy unit cannot be the patient: give patient ids "
                  "(Kermany-style file names, DICOM PatientID, a labels.csv patient_id column, NIH's Patient ID, "
                  "{split}_patient_ids in the .npz), or set [privacy] unit = \"scan\" (--privacy-unit scan) to "
                  "accept a guarantee per scan (a patient with several scans is then protected less)")
