# Times in the admin to the second with the timezone (settings.FORMAT_MODULE_PATH points here): operators compare
# them with chain timestamps and logs. Django's own English formats stop at the minute and name no timezone.
DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s T"
